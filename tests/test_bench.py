"""launch/bench.py on the tiny model (CPU): the stage step against the plain loop, evaluation, padding."""
import json
import shutil
import sys

import pytest

from conftest import command_env, run_cli

COMMON = {"bench_version", "run_id", "time", "shape", "precision", "batch", "seq", "world_size", "bench", "case",
          "status", "env"}
TRAIN = {"mode", "impl", "steps", "warmup", "seconds", "step_time_s", "tokens_per_s", "padfree_tokens_per_s",
         "processed_tokens", "padfree_tokens", "peak_mem_gib", "mem_metric", "setup_s"}
POSITIVE = ("seconds", "step_time_s", "tokens_per_s", "padfree_tokens_per_s", "processed_tokens", "padfree_tokens",
            "peak_mem_gib")


SMALL = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch", "16", "--seq", "32"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("bench1")
    out = tmp / "bench.jsonl"
    res = run_cli([sys.executable, "launch/bench.py", "--cases", "full:zero2,lora:zero2,qlora:zero2,eval,padding",
                   "--profile", "1", "--padding-sdpa-variants", "on", *SMALL, "--out", str(out)], timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    return tmp, res, _records(out)


def test_bench_tiny_full_lora_qlora_eval_padding(one_process):
    tmp_path, res, recs = one_process
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
        # one process: adapters and full fine-tuning run without ZeRO (zero.adapter_zero_stage,
        # zero.single_process_full_stage)
        assert r["impl"] == "remix_ds" and r["zero_stage"] == 0
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
                        "padding:remix_ds", "padding:naive_longest_no_cudnn", "padding:remix_ds_torch_sdpa"}
    assert len({r["padfree_tokens"] for r in pad.values()}) == 1
    naive, remix = pad["padding:naive_longest"], pad["padding:remix_ds"]
    assert remix["packing"] is True and remix["pad_fraction"] < 0.5 * naive["pad_fraction"], (remix, naive)
    assert pad["padding:naive_max_length"]["pad_fraction"] >= pad["padding:naive_dataset_longest"]["pad_fraction"] \
        >= naive["pad_fraction"] > 0.2
    assert remix["processed_tokens"] < naive["processed_tokens"] and remix["ratio_vs_naive_longest"] > 0
    for r in (naive, remix):   # --profile covers the packed step and the padded one it is compared with
        assert "aten::" in open(r["profile_file"]).read()
    # --padding-sdpa-variants on: pad-to-longest without cuDNN attention and the stage's batching with torch's own
    # SDPA choice, each counted by its wrapper alone (timed interleaved with the case it wraps, same engine/batches)
    for name, like, backends in (("padding:naive_longest_no_cudnn", naive, "FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH"),
                                 ("padding:remix_ds_torch_sdpa", remix, "torch's choice")):
        r = pad[name]
        assert r["sdpa_backends"] == backends
        assert r["processed_tokens"] == like["processed_tokens"] and r["padfree_tokens"] == like["padfree_tokens"]
        assert r["impl"] == like["impl"] and "SDPA" in r["batching"]
    assert remix["sdpa_backends"] == naive["sdpa_backends"] == "torch's choice"   # CPU: packed_sdpa_backends is None
    assert pad["padding:remix_ds_torch_sdpa"]["ratio_vs_naive_longest_no_cudnn"] > 0
    assert "meets_target" not in pad["padding:remix_ds_torch_sdpa"]   # the target: the stage's path as it runs


def test_bench_cases_parse():
    from remix_ds.bench import parse_cases

    plan = parse_cases("eval,full:zero2,lora,qlora:plain,full:zero3_offload,padding")
    assert plan == [("eval", []), ("full", ["zero2", "zero3_offload"]), ("lora", ["zero2", "zero3"]),
                    ("qlora", ["plain"]), ("padding", [])]


def test_summarize_prints_the_records_as_markdown(one_process, capsys):
    from remix_ds.bench import main

    tmp, _, recs = one_process
    assert main(["--summarize", str(tmp / "bench.jsonl")]) == 0
    md = capsys.readouterr().out
    assert f"### run {recs[0]['run_id']}" in md and "| case | ran as | tokens/s |" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    for r in recs:
        if r["bench"] == "train":
            key = r["case"] + (f" (paired with {r['paired_with']})" if r.get("paired_with") else "")
            assert key in rows, key
            if "ratio_tokens_per_s" in r:
                assert f"| {r['ratio_tokens_per_s']:.3f} |" in rows[key]
                assert ("met" if r["meets_target"] else "not met") in rows[key]
    assert "| no ZeRO |" in rows["lora:zero2"] and "| no ZeRO |" in rows["full:zero2"]
    (ev,) = [r for r in recs if r["bench"] == "eval"]
    assert f"| {ev['ratio']:.2f} |" in rows["eval:generate-vs-teacher-forced"]
    pad = [r for r in recs if r["case"] == "padding:remix_ds"][0]
    assert f"{pad['ratio_vs_naive_longest']:.3f} (vs pad-to-longest" in rows["padding:remix_ds"]
    assert main(["--summarize", str(tmp / "bench.jsonl"), "--run-id", "nope"]) == 0
    assert "no bench records with run_id nope" in capsys.readouterr().out


def test_bench_on_two_ranks_sums_over_ranks_and_trains_as_one_process(one_process, tmp_path):
    """`deepspeed --num_gpus 2 launch/bench.py`: the plain loop is torch DDP, every case runs its share of the
    same global batches, and the records count all ranks. Same batches, same initial weights: each case's mean
    loss over its steps must be the one process's (a rank running another's share, or a loss or count not
    summed over the ranks, changes it; a constant loss scale would not show: Adam and clipping absorb it)."""
    if shutil.which("deepspeed") is None:
        pytest.fail("the deepspeed launcher is not on PATH: install the package (README set-up)")
    _, _, ones = one_process
    out = tmp_path / "two.jsonl"
    res = run_cli(["deepspeed", "--num_gpus", "2", "launch/bench.py", "--cases", "full:zero2,full:zero3,lora:zero2,"
                   "padding", "--padding-sdpa-variants", "on", *SMALL, "--out", str(out)], timeout=600,
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    twos = _records(out)
    assert all(r["status"] == "ok" and r["world_size"] == 2 for r in twos), [(r["case"], r.get("reason")) for r in twos]
    one = {(r["case"], r.get("paired_with")): r for r in ones}
    two = {(r["case"], r.get("paired_with")): r for r in twos}
    # ZeRO-3 really partitions on two ranks; LoRA from zero2 runs without ZeRO, its gradients all-reduced
    assert two[("full:zero3", None)]["zero_stage"] == 3 and two[("lora:zero2", None)]["zero_stage"] == 0
    for key in [("full:plain", "zero2"), ("full:zero2", None), ("lora:plain", "zero2"), ("lora:zero2", None),
                ("padding:naive_max_length", None), ("padding:naive_longest", None), ("padding:remix_ds", None),
                ("padding:naive_longest_no_cudnn", None), ("padding:remix_ds_torch_sdpa", None)]:
        a, b = one[key], two[key]
        assert b["processed_tokens"] >= b["padfree_tokens"] == a["padfree_tokens"] > 0, key
        assert abs(a["mean_loss"] - b["mean_loss"]) < 2e-3, (key, a["mean_loss"], b["mean_loss"])
    for key in [("full:plain", "zero2"), ("full:zero2", None)]:   # fixed-length batches: 2 steps x 16 x 32, all ranks
        assert two[key]["processed_tokens"] == 2 * 16 * 32
    # ZeRO-3 over two ranks trains the same weights as ZeRO-2: the same losses
    assert abs(two[("full:zero3", None)]["mean_loss"] - one[("full:zero2", None)]["mean_loss"]) < 2e-3
    assert two[("full:zero3", None)]["ratio_tokens_per_s"] > 0 and two[("lora:zero2", None)]["ratio_tokens_per_s"] > 0


def test_gpu_script_invocations_parse(tmp_path):
    """launch/bench_gpu.sh runs on scarce, network-less GPU time: every bench command line it can issue must
    parse here (with the optional parts switched on), and name only known cases and ds_configs."""
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from remix_ds.bench import build_parser, parse_cases
    from remix_ds.zero import ds_config_path

    script = Path(__file__).resolve().parent.parent / "launch" / "bench_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    env = {"WARMUP": "3", "STEPS": "10", "RESULTS": str(tmp_path / "b.jsonl"),
           "CASES_1B": "full:zero2,full:zero3,full:zero2_offload,padding", "{BENCH_PROFILE:-2}": "2",
           "CASES_8B": "eval,lora:zero2"}
    padding = re.search(r"^PADDING=\((.*)\)$", text, re.M).group(1)
    for k, v in (("{BENCH_PADDING_WORDS:-8}", "50"), ("{BENCH_PADDING_MIX_RATIO:-1}", "0.25")):
        padding = padding.replace("$" + k, v)
    common = re.search(r"^COMMON=\((.*)\)$", text, re.M).group(1)
    lines = re.findall(r"\brun (\d+) (--shape .*)$", text, re.M)
    assert len(lines) == 6 and sum(int(limit) for limit, _ in lines[:3]) <= 590   # the core parts: one device call
    assert any("TORCH_CUDNN_SDPA_DEPRIORITIZED=1" in line and "run 120" in line for line in text.splitlines())
    assert any(line.endswith("--padding-mix-ratio 0.25") for _, line in lines)   # the minority-passage mix
    for _, args in lines:
        cmd = f"{args} {common}".replace('"${PADDING[@]}"', padding)   # the array's words, as bash expands it
        cmd = re.sub(r"\$\(STUDY (\w+)\)", r",study:\1", cmd)   # the script's STUDY function (BENCH_STUDY=1)
        for k, v in env.items():
            cmd = cmd.replace("${" + k + "}" if not k.startswith("{") else "$" + k, v).replace("$" + k, v)
        argv = shlex.split(cmd)
        ns = build_parser().parse_args(argv)
        assert ns.shape in ("llama-1b", "llama-8b") and ns.batch == 64 and ns.precision == "bf16"
        assert "$" not in cmd, cmd   # every variable substituted: the line parses as the script runs it
        if "padding" in ns.cases:
            assert ns.padding_words == 50 and ns.padding_mix_ratio == 0.25
        for mode, configs in parse_cases(ns.cases):
            for c in configs:
                if mode == "study":   # study:MODE: the study's workload in that fine-tuning mode
                    assert c in ("full", "lora", "qlora"), c
                elif c != "plain":
                    ds_config_path(c)   # raises for an unknown config


def test_gpu_wheels_script_names_the_installed_versions_of_what_the_gpu_machine_lacks():
    """launch/gpu_wheels.sh prepares .whl/ for the network-less GPU machine: the versions installed here (what the
    suite ran with), every package launch/bench_gpu.sh checks for that the GPU machine does not have, for its
    Python 3.12 on manylinux."""
    import importlib.metadata as md
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["bash", str(root / "launch" / "gpu_wheels.sh"), "--dry-run"], capture_output=True, text=True,
                         env=command_env(PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", res.stdout))
    assert pins["deepspeed"] == md.version("deepspeed") and pins["bitsandbytes"] == md.version("bitsandbytes")
    assert "--python-version 3.12" in res.stdout and "manylinux_2_24_x86_64" in res.stdout
    checked = re.search(r'for name in \((.*?)\):', (root / "launch" / "bench_gpu.sh").read_text()).group(1)
    on_the_gpu = {"torch", "transformers", "peft", "accelerate"}   # the machine's own (docs/benchmarks.md)
    for name in re.findall(r'"([^"]+)"', checked):
        assert name in on_the_gpu or name in pins, name
        if name in pins:
            assert pins[name] == md.version(name), name
    lean = subprocess.run(["bash", str(root / "launch" / "gpu_wheels.sh"), "--dry-run", "--no-bitsandbytes",
                           "--no-datasets"], capture_output=True, text=True)
    assert lean.returncode == 0 and "bitsandbytes" not in lean.stdout and "datasets==" not in lean.stdout
    assert subprocess.run(["bash", str(root / "launch" / "gpu_wheels.sh"), "--bogus"],
                          capture_output=True, text=True).returncode == 2


def test_bench_study_shape_case(tmp_path, tiny_dir):
    """study:MODE: the plain loop and the stage's path (packed, padded, packed with the 4-D mask) on D_A factoids
    alone and mixed 1:2 with passages; epoch times extrapolated from the step times, ratios from the records."""
    out = tmp_path / "bench.jsonl"
    res = run_cli([sys.executable, "launch/bench.py", "--shape", "tiny", "--cases", "study:lora", "--steps", "2",
                   "--warmup", "1", "--study-batch", "8", "--out", str(out)], timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    recs = {r["case"]: r for r in _records(out)}
    names = ("plain", "remix_ds", "remix_ds_padded", "remix_ds_mask")
    assert set(recs) == {f"study:lora:{d}:{n}" for d in ("factoids", "mix") for n in names}
    assert all(r["status"] == "ok" and r["bench"] == "study" for r in recs.values())
    for data, epoch in (("factoids", 2000), ("mix", 6000)):
        plain, packed, padded = (recs[f"study:lora:{data}:{n}"] for n in names[:3])
        for r in (plain, packed, padded):
            assert r["epoch_examples"] == epoch and r["steps_per_epoch"] == epoch // 8
            assert r["seconds_per_epoch"] == pytest.approx(r["step_time_median_s"] * r["steps_per_epoch"], rel=1e-3)
            assert r["padfree_tokens"] == plain["padfree_tokens"] > 0   # the same examples for every batching
        assert packed["ratio_epoch_time_vs_plain"] == pytest.approx(
            packed["seconds_per_epoch"] / plain["seconds_per_epoch"], rel=1e-3)
        assert packed["packed_kernel"] == "sdpa_groups"
    mix = {n: recs[f"study:lora:mix:{n}"] for n in names}
    # passages sized to ~165 tokens, factoids ~28: packing removes the padding that pad-to-longest leaves
    assert mix["remix_ds"]["length_max"] > 100 and mix["plain"]["pad_fraction"] > 0.2
    assert mix["remix_ds"]["pad_fraction"] < 0.02 < mix["remix_ds_mask"]["pad_fraction"] < mix["plain"]["pad_fraction"]
    assert isinstance(mix["remix_ds"]["meets_packing_target"], bool)
    # the engine's first step and the plain loop's, same weights and batch: the same mean loss
    assert recs["study:lora:factoids:remix_ds"]["first_step_loss_rel_diff"] < 1e-4
    summary = run_cli([sys.executable, "launch/bench.py", "--summarize", str(out)], timeout=120)
    assert "| lora | mix | remix_ds |" in summary.stdout and "s per D_A epoch" in summary.stdout
