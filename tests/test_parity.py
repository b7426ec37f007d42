"""picogpt parity (tools/parity.py): picogpt against PyTorch on a model.dat, layer by layer, as a command with an exit status.

A small random model passes; a copy with one weight of block 1 changed (given to picogpt, the original to
PyTorch) fails with exit status 1 and names block 1 as the first layer to diverge. Errors are one line.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_reference import random_tensors, write_model_dat

REPO = Path(__file__).resolve().parent.parent
# GPT-2's vocabulary, so that the default prompt's tokens exist; everything else small.
HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=3)


from picogpt import cli, parity


def main(argv):
    """What tools/parity.py runs: `picogpt parity`, under the script's name."""
    return cli.main(["parity", *argv], prog="parity")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, tensors): model.dat with random weights in the folder."""
    folder = tmp_path_factory.mktemp("parity")
    tensors = random_tensors(HPARAMS, seed=11)
    write_model_dat(folder / "model.dat", HPARAMS, tensors)
    return folder, tensors


def perturbed_copy(folder, tensors, name, index, delta, out_name):
    """A copy of the model with one weight changed, written (and checksummed) like any model.dat."""
    changed = dict(tensors)
    changed[name] = tensors[name].copy()
    changed[name][index] += np.float32(delta)
    return write_model_dat(folder / out_name, HPARAMS, changed)


def test_a_faithful_model_is_within_tolerance(small, tmp_path, capsys):
    folder, _ = small
    report = tmp_path / "parity.json"
    assert main(["--model", str(folder / "model.dat"), "-n", "8", "--json", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "verdict: within tolerance (exit status 0)" in out and err == ""
    for heading in ("hidden states", "logits at each prompt position", "greedy continuation, 8 tokens",
                    "KV cache", "tolerance   max|Δ| <= 1e-05 + 1e-04 x max|reference|"):
        assert heading in out
    assert "OUT OF TOLERANCE" not in out

    r = json.loads(report.read_text())
    assert r["ok"] and r["first_divergence"] is None and r["failures"] == []
    assert [x["layer"] for x in r["hidden_states"]] == ["embeddings", "block 0", "block 1", "block 2 + ln_f"]
    assert len(r["logits"]) == len(r["prompt_ids"]) == 19
    for x in r["hidden_states"] + r["logits"] + [r["cache"]["logits"]]:
        assert x["ok"] and x["max_abs_diff"] <= x["tolerance"] == pytest.approx(1e-5 + 1e-4 * x["max_abs_ref"])
    g = r["greedy"]
    assert g["identical"] and g["reference_tokens"] == g["picogpt_tokens"] and len(g["picogpt_tokens"]) == 8
    assert r["cache"]["logits"]["positions"] == 19 + 8 and r["cache"]["greedy"]["identical"]
    assert r["picogpt_blas"].startswith("numpy")


def test_a_changed_weight_fails_and_names_its_block(small, capsys):
    folder, tensors = small
    perturbed = perturbed_copy(folder, tensors, "h1/mlp/c_fc/w", (0, 0), 0.5, "perturbed.dat")
    status = main(["--model", str(perturbed), "--reference-model", str(folder / "model.dat"), "-n", "4"])
    out, err = capsys.readouterr()
    assert status == 1 and err == ""
    (verdict,) = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert verdict.startswith("verdict: NOT within tolerance (exit status 1); first to diverge: block 1 ")
    assert "h1/*" in verdict
    rows = {line.split("  ")[0]: line for line in out.splitlines() if line.startswith(("embeddings", "block"))}
    assert rows["embeddings"].endswith(" ok") and rows["block 0"].endswith(" ok")
    assert rows["block 1"].endswith("OUT OF TOLERANCE") and rows["block 2 + ln_f"].endswith("OUT OF TOLERANCE")


def test_the_same_changed_file_on_both_sides_agrees(small, capsys):
    """The check compares implementations, not files: a changed weight that both sides read is no mismatch."""
    folder, tensors = small
    perturbed = perturbed_copy(folder, tensors, "h2/attn/c_proj/w", (3, 4), -0.5, "perturbed2.dat")
    assert main(["--model", str(perturbed), "-n", "2"]) == 0
    assert "within tolerance" in capsys.readouterr().out


def test_a_change_in_the_last_block_is_named_with_the_final_layer_norm(small, tmp_path):
    folder, tensors = small
    perturbed = perturbed_copy(folder, tensors, "h2/attn/c_attn/b", (5,), 1.0, "perturbed3.dat")
    report = tmp_path / "r.json"
    assert main(["--model", str(perturbed), "--reference-model", str(folder / "model.dat"), "-n", "0",
                        "--json", str(report)]) == 1
    r = json.loads(report.read_text())
    assert r["first_divergence"] == "block 2 + ln_f"
    assert [x["ok"] for x in r["hidden_states"]] == [True, True, True, False]


def test_the_command_runs_as_a_script(small):
    folder, _ = small
    done = subprocess.run([sys.executable, str(REPO / "tools" / "parity.py"), "--model", str(folder / "model.dat"),
                           "-n", "3"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("verdict: within tolerance (exit status 0)")


def one_error_line(capsys):
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("parity: error: ")
    return err


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing" / "model.dat")]) == 1
    assert "does not exist" in one_error_line(capsys)
    assert main(["--model", "124M", "--models-dir", str(tmp_path)]) == 1
    err = one_error_line(capsys)
    assert "fetch it with: make fetch MODEL=124M" in err and "--download" not in err  # parity has no --download


def test_without_pytorch_one_sentence_says_how_to_install_it(small, monkeypatch, capsys):
    folder, _ = small
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert main(["--model", str(folder / "model.dat")]) == 1
    err = one_error_line(capsys)
    assert "the parity check needs PyTorch and transformers" in err
    assert "-m pip install torch==2.13.0 'transformers>=4.40'" in err


def test_other_mistakes_are_one_line(small, tmp_path, capsys):
    folder, tensors = small
    tiny = dict(HPARAMS, n_vocab=300)
    write_model_dat(tmp_path / "tiny.dat", tiny, random_tensors(tiny, seed=1))
    assert main(["--model", str(tmp_path / "tiny.dat")]) == 1
    assert "outside this model's vocabulary of 300" in one_error_line(capsys)
    assert main(["--model", str(folder / "model.dat"), "--reference-model", str(tmp_path / "tiny.dat")]) == 1
    assert "different models" in one_error_line(capsys)
    assert main(["--model", str(folder / "model.dat"), "-n", "60"]) == 1
    assert "exceed the model's context of 64" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        main(["--backend", "cuda"])
    assert exit_.value.code == 2
    assert one_error_line(capsys).endswith("see parity --help\n")


def test_tolerance_is_per_position_and_nan_never_passes():
    ref = np.array([[1000.0, 1.0], [1.0, 1.0]])
    ours = ref + np.array([[0.05, 0.0], [0.0, 0.05]])  # 0.05 is within 1e-4 x 1000, not within 1e-4 x 1
    r = parity.compare(ours, ref, 1e-5, 1e-4)
    assert not r["ok"] and r["worst_position"] == 1 and r["tolerance"] == pytest.approx(1e-5 + 1e-4)
    assert parity.compare(ref + np.array([[0.05, 0.0], [0.0, 0.0]]), ref, 1e-5, 1e-4)["ok"]
    r = parity.compare(np.array([1.0, np.nan]), np.array([1.0, 1.0]), 1e-5, 1e-4)
    assert not r["ok"] and np.isnan(r["max_abs_diff"])


def test_a_greedy_difference_at_a_near_tie_is_not_a_failure():
    logits = np.zeros(10)
    logits[[2, 5]] = 8.0, 8.0 - 3e-4  # tolerance at this step: 1e-5 + 1e-4 * 8 = 8.1e-4
    tie = parity.judge_tokens([1, 2, 7], [1, 5, 5], lambda i: logits, 1e-5, 1e-4)
    assert tie["ok"] and tie["tie"] and tie["first_difference"] == 1 and (tie["expected"], tie["got"]) == (2, 5)
    assert "a near tie" in parity.describe_tokens(tie, "PyTorch", "picogpt")
    logits[5] = 7.0
    mismatch = parity.judge_tokens([1, 2, 7], [1, 5, 5], lambda i: logits, 1e-5, 1e-4)
    assert not mismatch["ok"] and not mismatch["tie"]
    assert parity.describe_tokens(mismatch, "PyTorch", "picogpt").endswith("MISMATCH")
    assert parity.judge_tokens([1, 2], [1, 2], None, 1e-5, 1e-4)["ok"]
