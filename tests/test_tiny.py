import json
import os


def test_tiny_model_is_a_hf_directory(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for f in ("config.json", "model.safetensors", "tokenizer.json", "remix_tiny.json"):
        assert os.path.isfile(os.path.join(tiny_dir, f)), f
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    info = json.load(open(os.path.join(tiny_dir, "remix_tiny.json")))
    # briefly pretrained: the loss fell well below a random model's (ln 512 = 6.2)
    assert info["pretrain_final_loss"] < 4.0


def test_tiny_model_is_cached(tiny_dir):
    from remix_ds.tiny import build_tiny

    mtime = os.path.getmtime(os.path.join(tiny_dir, "model.safetensors"))
    assert build_tiny() == tiny_dir
    assert os.path.getmtime(os.path.join(tiny_dir, "model.safetensors")) == mtime
