"""The Hugging Face importer: folders written by transformers' save_pretrained -> model.dat, run against the
same folder loaded by transformers' from_pretrained; refusals are one line and leave no model.dat."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tf_fixture import to_model_dat_names, write_tf_checkpoint  # first: keeps TensorFlow's logging quiet
import torch  # noqa: E402
from conftest import assert_model_dat_holds, convert_hf_main  # noqa: E402
from hf_reference import hf_model, random_tensors  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_model import LOGITS_TOLERANCE, PROMPT, check_parity, hf_logits  # noqa: E402
from transformers import GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

from picogpt import convert_tf  # noqa: E402
from picogpt.convert_hf import convert_hf_checkpoint
from picogpt.tensors import hf_to_model_dat_name, model_dat_to_hf_name  # noqa: E402
from picogpt.errors import PicogptError  # noqa: E402
from picogpt.generate import generate  # noqa: E402
from picogpt.store import load  # noqa: E402
from picogpt.modelfile import open_model_file
from picogpt.tensors import gpt2_tensor_specs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "gpt2"
TOOL_PATH = REPO / "tools" / "convert_hf_checkpoint.py"
# GPT-2's vocabulary is required (the importer refuses any other); narrow and shallow to stay fast.
SMALL = dict(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
FAMILIES = {"124M": (768, 12), "355M": (1024, 16), "774M": (1280, 20), "1558M": (1600, 25)}




def save_hf(folder, hparams, tensors, **config):
    """save_pretrained a GPT2LMHeadModel holding `tensors` (model.dat names); then set keys of config.json."""
    hf_model(hparams, tensors).save_pretrained(folder)
    if config:
        edit_config(folder, **config)
    return folder


def edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


DELETE = object()


def assert_refused(capsys, folder, message):
    """The tool exits 1 with one line naming the problem, and the folder is left exactly as it was."""
    folder = Path(folder)
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    status = convert_hf_main([str(folder)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.startswith("convert_hf_checkpoint: error: ") and err.count("\n") == 1, err
    assert message in err, err
    if before is not None:
        assert sorted(p.name for p in folder.iterdir()) == before  # no model.dat, no partial file
    return err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A transformers-saved SMALL model folder (single model.safetensors), its tensors, and its model.dat."""
    tensors = random_tensors(SMALL, seed=11)
    folder = save_hf(tmp_path_factory.mktemp("small") / "hf", SMALL, tensors)
    out = folder.parent / "model.dat"
    convert_hf_checkpoint(folder, out)
    return folder, tensors, out


def copy_of(small, tmp_path):
    return Path(shutil.copytree(small[0], tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------------
# Parity with transformers on the same folder

def check_logits_and_greedy_tokens(model, reference, prompt, n_tokens=20):
    """Logits at every position within LOGITS_TOLERANCE, and the same n_tokens greedy tokens.

    check_parity's cheaper sibling for large vocabularies: instead of running transformers' generate() it
    runs transformers once on the prompt plus our greedy continuation and checks that its argmax after
    each prefix is the token we chose, which is exactly the condition for its greedy decoding to choose
    the same tokens; the logits of the generated positions are compared too. (The engine's no-cache
    path, the other half of check_parity, is the engine's business and tested in test_model.py.)
    """
    tokens = list(prompt) + list(generate(model, prompt, n_tokens))
    theirs = hf_logits(reference, tokens)
    np.testing.assert_allclose(model(tokens, all_logits=True), theirs, atol=LOGITS_TOLERANCE, rtol=0)
    assert theirs[len(prompt) - 1:-1].argmax(axis=-1).tolist() == tokens[len(prompt):]


def import_and_check_parity(folder, out, tensors=None, check=check_logits_and_greedy_tokens):
    hparams = convert_hf_checkpoint(folder, out)
    if tensors is not None:
        assert_model_dat_holds(out, tensors)
    model = load(out)
    # What transformers itself runs from the folder; "eager" attention, the kind that can return its weights.
    reference = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    check(model, reference, PROMPT)
    return hparams


@pytest.mark.parametrize("family", FAMILIES)
def test_each_size_family_matches_hugging_face(tmp_path, family):
    n_embd, n_head = FAMILIES[family]
    hparams = dict(n_vocab=50257, n_ctx=64, n_embd=n_embd, n_head=n_head, n_layer=1)
    tensors = random_tensors(hparams, seed=n_embd)
    save_hf(tmp_path / "hf", hparams, tensors)
    assert import_and_check_parity(tmp_path / "hf", tmp_path / "model.dat", tensors) == {
        **hparams, "layer_norm_epsilon": 1e-5}


def test_distilgpt2_shape_matches_hugging_face(tmp_path):
    """distilgpt2 is GPT-2 with 6 layers; its hub config.json is an old one (n_ctx, no scale_* or n_inner
    keys), so transformers' defaults must be the importer's."""
    hparams = dict(n_vocab=50257, n_ctx=64, n_embd=768, n_head=12, n_layer=6)
    tensors = random_tensors(hparams, seed=6)
    folder = save_hf(tmp_path / "distilgpt2", hparams, tensors)
    config = {"_num_labels": 1, "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64,
              "n_embd": 768, "n_head": 12, "n_layer": 6, "n_positions": 64, "resid_pdrop": 0.1,
              "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
              "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 50257,
              "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    assert import_and_check_parity(folder, tmp_path / "model.dat", tensors)["n_layer"] == 6


def test_other_tanh_gelu_names_epsilon_and_n_inner(small, tmp_path):
    """gelu_pytorch_tanh is the same tanh GELU (PyTorch's kernel); layer_norm_epsilon is carried over."""
    folder = copy_of(small, tmp_path)
    edit_config(folder, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-2, n_inner=4 * 64)
    hparams = import_and_check_parity(folder, tmp_path / "model.dat", small[1], check=check_parity)
    assert hparams["layer_norm_epsilon"] == 1e-2 and open_model_file(tmp_path / "model.dat").hparams == hparams


# ---------------------------------------------------------------------------------------------------
# Layouts: shards, prefixes, dtypes, the older hub files

def test_sharded_save_imports_byte_identically(small, tmp_path):
    folder, tensors, single = small
    hf_model(SMALL, tensors).save_pretrained(tmp_path / "sharded", max_shard_size="5MB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    convert_hf_checkpoint(tmp_path / "sharded", tmp_path / "model.dat")
    assert (tmp_path / "model.dat").read_bytes() == single.read_bytes()


def test_unprefixed_gpt2model_save_imports_byte_identically(small, tmp_path):
    folder, tensors, single = small
    hf_model(SMALL, tensors).transformer.save_pretrained(tmp_path / "base")  # GPT2Model: "h.0.ln_1.weight"
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["GPT2Model"]
    convert_hf_checkpoint(tmp_path / "base", tmp_path / "model.dat")
    assert (tmp_path / "model.dat").read_bytes() == single.read_bytes()


def hub_style_state(tensors, hparams, lm_head=True):
    """The older hub files' layout: unprefixed names, the causal-mask buffers, lm_head.weight saved too."""
    state = {model_dat_to_hf_name(name, prefix=""): np.ascontiguousarray(a) for name, a in tensors.items()}
    n_ctx = hparams["n_ctx"]
    for i in range(hparams["n_layer"]):
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
        state[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    if lm_head:
        state["lm_head.weight"] = state["wte.weight"].copy()
    return state


def test_older_hub_layout_with_mask_buffers_and_a_tied_head(small, tmp_path):
    folder, tensors, single = small
    hub = copy_of(small, tmp_path)
    save_file(hub_style_state(tensors, SMALL), hub / "model.safetensors", metadata={"format": "pt"})
    convert_hf_checkpoint(hub, tmp_path / "model.dat")
    assert (tmp_path / "model.dat").read_bytes() == single.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_widen_exactly(small, tmp_path, dtype):
    folder, tensors, _ = small
    model = hf_model(SMALL, tensors).to(dtype)
    model.save_pretrained(tmp_path / "half")
    convert_hf_checkpoint(tmp_path / "half", tmp_path / "model.dat")
    state = model.state_dict()
    widened = {name: state[model_dat_to_hf_name(name)].float().numpy() for name in tensors}
    assert_model_dat_holds(tmp_path / "model.dat", widened)
    assert not np.array_equal(widened["wte"], tensors["wte"])  # really rounded: the test can tell

    # A saved lm_head is compared with wte in row blocks, through the same reader.
    state = {k: v.contiguous() for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    from safetensors.torch import save_file as save_torch
    save_torch(state, tmp_path / "half" / "model.safetensors", metadata={"format": "pt"})
    convert_hf_checkpoint(tmp_path / "half", tmp_path / "model2.dat")
    assert (tmp_path / "model2.dat").read_bytes() == (tmp_path / "model.dat").read_bytes()
    state["lm_head.weight"][50256, 3] += 1  # the last row, in the last (partial) block
    save_torch(state, tmp_path / "half" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PicogptError, match="lm_head.weight differs from the token embedding"):
        convert_hf_checkpoint(tmp_path / "half", tmp_path / "model3.dat")
    assert not (tmp_path / "model3.dat").exists()


def test_the_same_weights_through_tensorflow_and_hugging_face_give_the_same_file(tmp_path):
    variables = write_tf_checkpoint(tmp_path / "ckpt", SMALL, seed=3)
    hf_model(SMALL, to_model_dat_names(variables)).save_pretrained(tmp_path / "hf")
    convert_tf.convert_checkpoint(tmp_path / "ckpt", tmp_path / "tf.dat")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "hf.dat")
    from_tf, from_hf = open_model_file(tmp_path / "tf.dat"), open_model_file(tmp_path / "hf.dat")
    assert from_tf.hparams == from_hf.hparams
    for name in gpt2_tensor_specs(from_tf.hparams):
        np.testing.assert_array_equal(from_hf.tensors[name], from_tf.tensors[name], err_msg=name)
    assert (tmp_path / "hf.dat").read_bytes() == (tmp_path / "tf.dat").read_bytes()


# ---------------------------------------------------------------------------------------------------
# Refusals: one line, exit status 1, nothing written

@pytest.mark.parametrize("key, value, message", [
    ("activation_function", "gelu", "activation_function is 'gelu', not GPT-2's tanh GELU"),
    ("activation_function", "relu", "activation_function is 'relu'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx is true"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn is true"),
    ("scale_attn_weights", False, "scale_attn_weights is false"),
    ("add_cross_attention", True, "add_cross_attention is true"),
    ("vocab_size", 50304, "vocab_size is 50304, not GPT-2's 50257"),
    ("model_type", "gpt_neo", "model_type is 'gpt_neo', not 'gpt2'"),
    ("model_type", DELETE, "model_type is None, not 'gpt2'"),
    ("n_inner", 128, "n_inner is 128, not 4 * n_embd = 256"),
    ("quantization_config", {"quant_method": "bitsandbytes"}, "quantized"),
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon is '1e-5'"),
    ("n_head", 5, "n_embd 64 is not a multiple of n_head 5"),
    ("n_layer", 2.0, "n_layer is 2.0, not a positive whole number"),
])
def test_configs_picogpt_cannot_run_exactly_are_refused(small, tmp_path, capsys, key, value, message):
    folder = copy_of(small, tmp_path)
    edit_config(folder, **{key: value})
    assert_refused(capsys, folder, message)


def test_weights_that_do_not_match_config_json(small, tmp_path, capsys):
    folder = copy_of(small, tmp_path)
    edit_config(folder, n_layer=3)
    assert_refused(capsys, folder, "no tensor transformer.h.2.ln_1.weight, which config.json (n_layer 3")
    edit_config(folder, n_layer=1)
    assert_refused(capsys, folder, "holds transformer.h.1.")
    edit_config(folder, n_layer=2, n_positions=128)
    assert_refused(capsys, folder, "transformer.wpe.weight is [64, 64] but config.json")


@pytest.mark.parametrize("extra, message", [
    ({"score.weight": np.zeros((2, 64), np.float32)}, "score.weight, which is not part of a GPT-2 language model"),
    ({"h.0.crossattention.c_attn.weight": np.zeros((64, 128), np.float32)}, "h.0.crossattention.c_attn.weight"),
    ({"lm_head.weight": np.zeros((50257, 64), np.float32)}, "lm_head.weight differs from the token embedding"),
    ({"wte.weight": np.zeros((50257, 64), np.float32)}, "two copies of one weight"),
    ({"transformer.h.0.ln_1.weight": np.zeros(64, np.int8)}, "stored as I8"),
    ({"transformer.h.0.ln_1.weight": np.zeros(64, np.float64)}, "stored as F64"),
])
def test_unexpected_tensors_are_refused(small, tmp_path, capsys, extra, message):
    folder, tensors, _ = small
    state = {model_dat_to_hf_name(name): np.ascontiguousarray(a) for name, a in tensors.items()}
    folder = copy_of(small, tmp_path)
    save_file({**state, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    assert_refused(capsys, folder, message)


def test_an_untied_config_needs_its_head(small, tmp_path, capsys):
    folder = copy_of(small, tmp_path)
    edit_config(folder, tie_word_embeddings=False)
    assert_refused(capsys, folder, "no lm_head.weight")
    state = hub_style_state(small[1], SMALL)  # with lm_head.weight equal to wte: runs exactly after all
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    convert_hf_checkpoint(folder, tmp_path / "model.dat")
    assert (tmp_path / "model.dat").read_bytes() == small[2].read_bytes()


def test_pickles_and_other_folders_are_refused_with_what_to_do(small, tmp_path, capsys):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(small[0] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it is never opened")
    err = assert_refused(capsys, folder, "PyTorch pickle weights (pytorch_model.bin)")
    assert f"from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)" in err

    (folder / "pytorch_model.bin").unlink()
    (folder / "tf_model.h5").write_bytes(b"")
    assert_refused(capsys, folder, "has no model.safetensors (only tf_model.h5")
    (folder / "tf_model.h5").unlink()
    assert_refused(capsys, folder, "has no model.safetensors; download")
    assert_refused(capsys, tmp_path / "nowhere", "is not a folder")

    for name in ["hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.meta"]:  # OpenAI's layout
        (folder / name).write_text("{}")
    assert_refused(capsys, folder, "an OpenAI TensorFlow checkpoint, not a Hugging Face model; convert it "
                                   "with: ")
    assert_refused(capsys, folder, f"picogpt convert-tf --checkpoint-dir {folder}")

    no_config = copy_of(small, tmp_path)
    (no_config / "config.json").unlink()
    assert_refused(capsys, no_config, "has no config.json")


def test_damaged_and_incomplete_downloads(small, tmp_path, capsys):
    folder, tensors, _ = small
    truncated = copy_of(small, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(capsys, truncated, "download it again")
    (truncated / "model.safetensors").write_bytes(b"<html>Not found</html>")
    assert_refused(capsys, truncated, "download it again")

    sharded = tmp_path / "sharded"
    hf_model(SMALL, tensors).save_pretrained(sharded, max_shard_size="5MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (sharded / last).rename(tmp_path / last)
    assert_refused(capsys, sharded, f"lacks {last}, a shard listed in model.safetensors.index.json")
    (tmp_path / last).rename(sharded / last)
    index["weight_map"]["transformer.h.0.ln_1.weight"] = last if index["weight_map"][
        "transformer.h.0.ln_1.weight"] != last else sorted(set(index["weight_map"].values()))[0]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(capsys, sharded, "which model.safetensors.index.json does not list there")
    (sharded / "model.safetensors.index.json").unlink()
    assert_refused(capsys, sharded, "but neither model.safetensors nor model.safetensors.index.json")


def test_an_interrupted_conversion_leaves_nothing(small, tmp_path, ctrl_c_during_writing):
    with pytest.raises(KeyboardInterrupt):
        convert_hf_checkpoint(small[0], tmp_path / "out" / "model.dat")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Tokenizer files

def test_gpt2s_own_tokenizer_files_are_accepted(small, tmp_path):
    folder = copy_of(small, tmp_path)
    shutil.copy(DATA / "encoder.json", folder / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", folder / "merges.txt")
    # vocab.json reformatted (HF writes it compactly) and merges.txt re-saved are the same tokenizer.
    (folder / "vocab.json").write_text(json.dumps(json.loads((DATA / "encoder.json").read_text()), indent=1))
    (folder / "merges.txt").write_text((DATA / "vocab.bpe").read_text().rstrip("\n"))
    # tokenizer.json as transformers 5 saves GPT-2's tokenizer (merges as pairs, <|endoftext|> added).
    GPT2Tokenizer.from_pretrained(folder).save_pretrained(folder)
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["merges"][0] == ["Ġ", "t"]
    convert_hf_checkpoint(folder, tmp_path / "model.dat")
    assert (tmp_path / "model.dat").read_bytes() == small[2].read_bytes()

    # tokenizer.json alone, merges as "a b" strings (older tokenizers).
    for name in ["vocab.json", "merges.txt"]:
        (folder / name).unlink()
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    convert_hf_checkpoint(folder, tmp_path / "model2.dat")


def test_a_different_tokenizer_is_refused(small, tmp_path, capsys):
    folder = copy_of(small, tmp_path)
    lines = (DATA / "vocab.bpe").read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # the same merges, ranked differently: a different tokenizer
    (folder / "merges.txt").write_text("\n".join(lines))
    assert_refused(capsys, folder, "merges.txt: the BPE merges (50000) differ from GPT-2's (50000), so this "
                                   "model's tokenizer is not GPT-2's")
    (folder / "merges.txt").unlink()

    vocab = json.loads((DATA / "encoder.json").read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    assert_refused(capsys, folder, "vocab.json: the vocabulary (50257 tokens) differs from GPT-2's")
    (folder / "vocab.json").unlink()

    src = tmp_path / "tok"
    src.mkdir()
    shutil.copy(DATA / "encoder.json", src / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", src / "merges.txt")
    tokenizer = GPT2Tokenizer.from_pretrained(src)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # a fine-tune's extra token
    tokenizer.save_pretrained(folder)
    assert_refused(capsys, folder, "tokenizer.json: it adds the token '<|pad|>'")


# ---------------------------------------------------------------------------------------------------
# Names, the command, and no PyTorch or TensorFlow

def test_name_mapping_both_ways():
    for name in gpt2_tensor_specs(dict(SMALL, n_layer=12)):
        assert hf_to_model_dat_name(model_dat_to_hf_name(name)) == name
        assert hf_to_model_dat_name(model_dat_to_hf_name(name, prefix="")) == name
    assert hf_to_model_dat_name("transformer.h.11.mlp.c_fc.weight") == "h11/mlp/c_fc/w"
    for ours, theirs in [("wte", "transformer.wte.weight"), ("wpe", "transformer.wpe.weight"),
                         ("h3/ln_1/g", "transformer.h.3.ln_1.weight"), ("h3/ln_2/b", "transformer.h.3.ln_2.bias"),
                         ("h0/attn/c_attn/w", "transformer.h.0.attn.c_attn.weight"),
                         ("h0/attn/c_proj/b", "transformer.h.0.attn.c_proj.bias"),
                         ("ln_f/g", "transformer.ln_f.weight")]:
        assert model_dat_to_hf_name(ours) == theirs
    for other in ["lm_head.weight", "h.0.attn.bias", "h.0.attn.masked_bias", "h.01.ln_1.weight", "h.x.ln_1.weight",
                  "transformer.transformer.wte.weight", "model.wte.weight", "score.weight", "wte", "h.0.ln_3.weight"]:
        assert hf_to_model_dat_name(other) is None, other


def test_the_tool_runs_as_a_command_without_torch_or_tensorflow(small, tmp_path):
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(TOOL_PATH), str(small[0]), "--out", str(tmp_path / "m.dat")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'm.dat'} (13.3 MB: n_layer 2, n_embd 64" in done.stderr
    assert (tmp_path / "m.dat").read_bytes() == small[2].read_bytes() and time.perf_counter() - t < 60

    bad = subprocess.run([sys.executable, str(TOOL_PATH), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("convert_hf_checkpoint: error: ")

    code = ("import sys; from picogpt.convert_hf import convert_hf_checkpoint; "
            f"convert_hf_checkpoint({str(small[0])!r}, {str(tmp_path / 'n.dat')!r}); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'transformers', 'jax'}); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_out_is_model_dat_in_the_folder(small, tmp_path, capsys):
    folder = copy_of(small, tmp_path)
    assert convert_hf_main([str(folder)]) == 0
    assert (folder / "model.dat").read_bytes() == small[2].read_bytes()
    assert f"wrote {folder / 'model.dat'}" in capsys.readouterr().err


def test_without_safetensors_the_error_says_what_to_install(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(PicogptError,
                       match=r"needs safetensors, which is not installed: .* -m pip install 'safetensors>=0.4'$"):
        convert_hf_checkpoint(small[0], tmp_path / "model.dat")
    assert not (tmp_path / "model.dat").exists()


def test_convert_hf_to_int8(small, tmp_path, capsys):
    """--dtype int8: every matrix within half a step of its unit's scale, the error reported."""
    folder, tensors, _ = small
    assert convert_hf_main([str(folder), "--out", str(tmp_path / "model.dat"), "--dtype", "int8"]) == 0
    assert "int8 weights: " in capsys.readouterr().err
    opened = open_model_file(tmp_path / "model.dat")
    assert opened.weight_dtype == "int8" and set(opened.quantization_errors) == {
        name for name in tensors if name == "wte" or name.endswith("/w")}
    for name, array in opened.float32_tensors():
        np.testing.assert_allclose(array, tensors[name], atol=np.abs(tensors[name]).max() / 127 / 2 * 1.001)
