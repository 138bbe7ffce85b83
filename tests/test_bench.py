"""launch/bench.py on the tiny model (CPU): the stage step against the plain loop, evaluation, padding."""
import json
import sys

from conftest import run_cli

COMMON = {"bench_version", "run_id", "time", "shape", "precision", "batch", "seq", "world_size", "bench", "case",
          "status", "env"}
TRAIN = {"mode", "impl", "steps", "warmup", "seconds", "step_time_s", "tokens_per_s", "padfree_tokens_per_s",
         "processed_tokens", "padfree_tokens", "peak_mem_gib", "mem_metric", "setup_s"}
POSITIVE = ("seconds", "step_time_s", "tokens_per_s", "padfree_tokens_per_s", "processed_tokens", "padfree_tokens",
            "peak_mem_gib")


def test_bench_tiny_full_lora_qlora_eval_padding(tmp_path, tiny_dir):
    out = tmp_path / "bench.jsonl"
    res = run_cli([sys.executable, "launch/bench.py", "--shape", "tiny", "--cases",
                   "full:zero2,lora:zero2,qlora:zero2,eval,padding", "--profile", "1",
                   "--steps", "2", "--warmup", "1", "--batch", "16", "--seq", "32", "--out", str(out)], timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["status"] == "ok" for r in recs), [(r["case"], r.get("reason")) for r in recs]
    train = {(r["case"], r.get("paired_with")): r for r in recs if r["bench"] == "train"}
    assert set(train) == {("full:plain", "zero2"), ("full:zero2", None), ("lora:plain", "zero2"), ("lora:zero2", None),
                          ("qlora:plain", "zero2"), ("qlora:zero2", None)}
    for r in train.values():
        assert COMMON | TRAIN <= set(r), sorted(COMMON | TRAIN - set(r))
        assert r["shape"] == "tiny" and r["batch"] == 16 and r["seq"] == 32 and r["steps"] == 2
        for k in POSITIVE:
            assert r[k] > 0, (r["case"], k, r[k])
        # fixed-length batches: no padding, and 2 steps x 16 x 32 tokens were processed
        assert r["processed_tokens"] == r["padfree_tokens"] == 2 * 16 * 32
    for case in ("full:zero2", "lora:zero2", "qlora:zero2"):
        r = train[(case, None)]
        # adapters run without ZeRO (engine.adapter_zero_stage)
        assert r["impl"] == "remix_ds" and r["zero_stage"] == (2 if case == "full:zero2" else 0)
        assert r["ds_config"] == "zero2"
        assert r["ratio_tokens_per_s"] > 0 and isinstance(r["meets_target"], bool)
    # --profile: operator tables of the remix_ds step and of the plain loop, beside the JSON lines
    lora = train[("lora:zero2", None)]
    for key in ("profile_file", "plain_profile_file"):
        text = open(lora[key]).read()
        assert lora[key].startswith(str(tmp_path)) and "Self CPU" in text and "aten::" in text
    (ev,) = [r for r in recs if r["bench"] == "eval"]
    assert ev["generate_questions_per_s"] > 0 and ev["teacher_forced_questions_per_s"] > 0 and ev["ratio"] > 0
    assert "ratio" in res.stdout and "full:zero2" in res.stdout
    # padding: the same examples under each batching; the stage's packing leaves far less padding
    pad = {r["case"]: r for r in recs if r["bench"] == "padding"}
    assert set(pad) == {"padding:naive_max_length", "padding:naive_dataset_longest", "padding:naive_longest",
                        "padding:remix_ds"}
    assert len({r["padfree_tokens"] for r in pad.values()}) == 1
    naive, remix = pad["padding:naive_longest"], pad["padding:remix_ds"]
    assert remix["packing"] is True and remix["pad_fraction"] < 0.5 * naive["pad_fraction"], (remix, naive)
    assert pad["padding:naive_max_length"]["pad_fraction"] >= pad["padding:naive_dataset_longest"]["pad_fraction"] \
        >= naive["pad_fraction"] > 0.2
    assert remix["processed_tokens"] < naive["processed_tokens"] and remix["ratio_vs_naive_longest"] > 0


def test_bench_cases_parse():
    from remix_ds.bench import parse_cases

    plan = parse_cases("eval,full:zero2,lora,qlora:plain,full:zero3_offload,padding")
    assert plan == [("eval", []), ("full", ["zero2", "zero3_offload"]), ("lora", ["zero2", "zero3"]),
                    ("qlora", ["plain"]), ("padding", [])]


def test_gpu_script_invocations_parse(tmp_path):
    """launch/bench_gpu.sh runs on scarce, network-less GPU time: every bench command line it can issue must
    parse here (with the optional parts switched on), and name only known cases and ds_configs."""
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from remix_ds.bench import build_parser, parse_cases
    from remix_ds.engine import ds_config_path

    script = Path(__file__).resolve().parent.parent / "launch" / "bench_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    env = {"WARMUP": "3", "STEPS": "10", "RESULTS": str(tmp_path / "b.jsonl"),
           "CASES_1B": "full:zero2,full:zero3,full:zero2_offload,padding", "{BENCH_PROFILE:-2}": "2",
           "{BENCH_PADDING_WORDS:-8}": "50"}
    common = re.search(r"^COMMON=\((.*)\)$", text, re.M).group(1)
    lines = re.findall(r"\brun (\d+) (--shape .*)$", text, re.M)
    assert len(lines) == 4 and sum(int(limit) for limit, _ in lines[:3]) <= 590
    for _, args in lines:
        cmd = f"{args} {common}"
        for k, v in env.items():
            cmd = cmd.replace("${" + k + "}" if not k.startswith("{") else "$" + k, v).replace("$" + k, v)
        argv = shlex.split(cmd)
        ns = build_parser().parse_args(argv)
        assert ns.shape in ("llama-1b", "llama-8b") and ns.batch == 64 and ns.precision == "bf16"
        assert "$" not in cmd, cmd   # every variable substituted: the line parses as the script runs it
        if "padding" in ns.cases:
            assert ns.padding_words == 50
        for mode, configs in parse_cases(ns.cases):
            for c in configs:
                if c != "plain":
                    ds_config_path(c)   # raises for an unknown config
