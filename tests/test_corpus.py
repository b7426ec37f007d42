"""picogpt score-corpus and complete-corpus in one process: the formats, the scores against Hugging Face's
loss (short documents, and longer-than-context ones with its sliding-window perplexity recipe), completions
against picogpt's own generate, and never losing work: real runs killed with SIGKILL at random points and
started again give the file an uninterrupted run gives, byte for byte.

The same commands on a Ray cluster are tests/test_corpus_ray.py.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt import corpus
from picogpt.cli import main
from picogpt.generate import generate
from picogpt.model import GPT2
from picogpt.tokenizer import EOT, decode, encode

HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, layer_norm_epsilon=1e-5)
WORDS = ("the function returns a new list of values from the optional argument and raises an error if the "
         "file does not exist or the module is not found").split()
NLL_TOLERANCE = 1e-4  # mean negative log-likelihood against Hugging Face's loss (they agree to about 1e-6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tensors = random_tensors(HPARAMS, seed=3)
    path = write_model_dat(tmp_path_factory.mktemp("model") / "model.dat", HPARAMS, tensors)
    return path, GPT2(HPARAMS, tensors), hf_model(HPARAMS, tensors)


def text_of(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's refusals
        return e.code


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def hf_mean_nll(reference, ids, stride):
    """Hugging Face's perplexity recipe (its guide to fixed-length models): windows of n_ctx tokens moving
    `stride` tokens, each scoring the tokens the previous one did not, the window's loss weighted by them."""
    n_ctx = HPARAMS["n_ctx"]
    input_ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        target_len = end - prev_end
        window = input_ids[:, begin:end]
        targets = window.clone()
        targets[:, :-target_len] = -100
        with torch.no_grad():
            loss = reference(window, labels=targets).loss
        n_scored = int((targets != -100).sum()) - (1 if begin == 0 else 0)  # the first token predicts nothing
        n_scored = min(n_scored, end - begin - 1)
        nll_sum += float(loss) * n_scored
        n_tokens += n_scored
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


def test_scores_are_hugging_faces_loss_short_and_longer_than_the_context(weights, tmp_path):
    path, _, reference = weights
    rng = random.Random(1)
    texts = [text_of(rng, n) for n in (3, 10, 25, 40, 55, 120, 300)]  # the last two exceed the 64-token context
    inputs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    for stride in (None, 16):
        out = tmp_path / f"scores-{stride}.jsonl"
        argv = ["score-corpus", str(inputs), "--out", str(out), "--model", str(path), "--batch-tokens", "256"]
        assert run(argv + (["--stride", str(stride)] if stride else [])) == 0
        records = read_lines(out)
        assert [r["id"] for r in records] == list(range(len(texts)))
        for text, record in zip(texts, records):
            ids = [EOT] + encode(text)
            assert record["n_tokens"] == len(ids) - 1
            if len(ids) <= HPARAMS["n_ctx"]:
                with torch.no_grad():
                    theirs = float(reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
                assert "windows" not in record
            else:
                theirs, n_scored = hf_mean_nll(reference, ids, stride or HPARAMS["n_ctx"] // 2)
                assert n_scored == record["n_tokens"] and record["stride"] == (stride or 32) and record["windows"] > 1
            assert abs(record["mean_nll"] - theirs) < NLL_TOLERANCE
            assert record["perplexity"] == pytest.approx(math.exp(record["mean_nll"]), rel=1e-5)
            assert record["log_prob"] == pytest.approx(-record["mean_nll"] * record["n_tokens"], rel=1e-5)


def test_formats_ids_and_bad_documents(weights, tmp_path, capsys):
    path = weights[0]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A whole file is one document.\nIts second line too.\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_bytes(b"caf\xe9 is latin-1")
    (folder / "sub" / "c.txt").write_text("  \n", encoding="utf-8")
    lines = [json.dumps({"text": "with no id"}), "", json.dumps({"id": "k", "text": "with an id"}), "{not json",
             json.dumps({"id": 7, "body": "no text field"}), json.dumps({"text": 12}), json.dumps([1, 2]),
             json.dumps({"text": ""}), json.dumps({"text": "after the bad ones"})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert run(["score-corpus", str(tmp_path / "r.jsonl"), str(folder), "--out", str(out), "--model", str(path)]) == 0
    records = read_lines(out)
    jsonl = str(tmp_path / "r.jsonl")
    assert [r["id"] for r in records] == [f"{jsonl}:1", "k", f"{jsonl}:4", 7, f"{jsonl}:6", f"{jsonl}:7", f"{jsonl}:8",
                                          f"{jsonl}:9", str(folder / "a.txt"), str(folder / "sub" / "b.txt"),
                                          str(folder / "sub" / "c.txt")]
    errors = {r["id"]: r.get("error") for r in records}
    assert errors[f"{jsonl}:4"].startswith("malformed JSON")
    assert errors[7] == "no 'text' field"
    assert errors[f"{jsonl}:6"] == "the 'text' field is int, not text"
    assert errors[f"{jsonl}:7"] == "not a JSON object but list"
    assert errors[f"{jsonl}:8"] == "empty" and errors[str(folder / "sub" / "c.txt")] == "empty"
    assert errors[str(folder / "sub" / "b.txt")].startswith("not UTF-8 (byte 0xe9")
    assert records[-3]["n_tokens"] == len(encode("A whole file is one document.\nIts second line too.\n"))
    assert "7 documents with an error field" in capsys.readouterr().err

    # --lines: a .txt line per document (blank lines are not documents); a glob pattern
    (tmp_path / "l.txt").write_text("first line\n\nsecond line\r\n", encoding="utf-8")
    out2 = tmp_path / "lines.jsonl"
    assert run(["score-corpus", str(tmp_path / "l*.txt"), "--lines", "--out", str(out2), "--model", str(path)]) == 0
    assert [r["id"] for r in read_lines(out2)] == [f"{tmp_path / 'l.txt'}:1", f"{tmp_path / 'l.txt'}:3"]
    assert read_lines(out2)[1]["n_tokens"] == len(encode("second line"))


def test_greedy_and_sampled_completions(weights, tmp_path):
    path, model, _ = weights
    rng = random.Random(2)
    texts = [text_of(rng, n) for n in (2, 5, 9, 14, 30, 70)]  # the last is too long for 20 more tokens
    inputs = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "greedy.jsonl"
    assert run(["complete-corpus", str(inputs), "--out", str(out), "-n", "12", "--ids", "--model", str(path)]) == 0
    records = read_lines(out)
    for text, record in zip(texts[:-1], records):
        expected = list(generate(model, encode(text), 12))
        assert record["ids"] == expected and record["completion"] == decode(expected)
        assert record["n_tokens"] == len(encode(text))
    assert records[-1]["error"].startswith(f"the document is {len(encode(texts[-1]))} tokens; with 12 new ones")

    # Sampling: each document has its own random stream, so its text does not depend on its batch.
    sampled = []
    for batch_tokens in (4096, 16):
        out = tmp_path / f"sampled-{batch_tokens}.jsonl"
        assert run(["complete-corpus", str(inputs), "--out", str(out), "-n", "12", "--temperature", "1.2",
                    "--top-k", "50", "--seed", "5", "--batch-tokens", str(batch_tokens), "--model", str(path)]) == 0
        sampled.append(read_lines(out))
    assert sampled[0] == sampled[1]
    assert [r.get("completion") for r in sampled[0][:-1]] != [r.get("completion") for r in records[:-1]]


def test_changed_settings_and_foreign_files_are_refused(weights, tmp_path, capsys):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", str(path)]) == 0
    before = out.read_bytes()
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", str(path), "--stride", "8"]) == 1
    assert "was made with other settings (they differ in stride)" in capsys.readouterr().err
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", "demo"]) == 1
    assert "differ in model, model_sha256" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", str(path)]) == 0
    assert "is complete: all 5 documents are in it" in capsys.readouterr().err
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("precious\n")
    assert run(["score-corpus", str(inputs), "--out", str(foreign), "--model", str(path)]) == 1
    assert "was not written by this command" in capsys.readouterr().err and foreign.read_text() == "precious\n"
    for bad in (["nothing*.jsonl"], [str(tmp_path / "missing.jsonl")], [str(tmp_path / "out.jsonl.run.json")]):
        assert run(["score-corpus", *bad, "--out", str(tmp_path / "x.jsonl"), "--model", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("nothing matches" in err or "does not exist" in err or "expected a .jsonl" in err)


def test_full_disk_is_one_line_and_the_same_command_finishes(weights, tmp_path, capsys, monkeypatch):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i % 7 + 1)} for i in range(200)])
    argv = ["score-corpus", str(inputs), "--model", str(path)]
    assert run(argv + ["--out", str(tmp_path / "whole.jsonl")]) == 0
    capsys.readouterr()
    out = tmp_path / "out.jsonl"

    class FillingDisk:  # the output file, on a disk that fills up halfway through the third chunk
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                self.file.write(data[:len(data) // 2])
                self.file.flush()
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    real_open = corpus.CorpusOutput.open

    def open_on_a_filling_disk(self, chunks):
        remaining = real_open(self, chunks)
        self._file = FillingDisk(self._file)
        return remaining
    monkeypatch.setattr(corpus.CorpusOutput, "open", open_on_a_filling_disk)
    assert run(argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}: No space left on device; 128 documents are saved" in err
    monkeypatch.undo()
    assert run(argv + ["--out", str(out)]) == 0  # room again: the same command finishes the file
    assert "resuming" in capsys.readouterr().err
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def kill_and_resume(argv, rng, max_kills=6):
    """Run a command as a separate process, kill it with SIGKILL at random moments, and start it again
    each time, until it finishes: the number of kills that hit it while it ran."""
    kills = 0
    for attempt in range(max_kills + 1):
        process = subprocess.Popen([sys.executable, "-m", "picogpt", *argv], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        if attempt < max_kills:
            try:
                process.wait(timeout=rng.uniform(1.0, 4.0))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        else:
            process.wait(timeout=600)
        assert process.returncode == 0, process.stderr.read()
        return kills
    raise AssertionError("unreachable")


def test_killed_runs_resume_to_the_uninterrupted_file(weights, tmp_path):
    path = weights[0]
    rng = random.Random(11)
    records = [{"id": f"doc-{i}", "text": text_of(rng, rng.randint(5, 45))} for i in range(900)]
    records[100]["text"] = text_of(rng, 200)  # longer than the context: the sliding window
    inputs = write_jsonl(tmp_path / "d.jsonl", records)
    whole = tmp_path / "whole.jsonl"
    argv = ["score-corpus", str(inputs), "--model", str(path), "--batch-tokens", "512"]
    assert run(argv + ["--out", str(whole)]) == 0
    killed = tmp_path / "killed.jsonl"
    kills = kill_and_resume(argv + ["--out", str(killed)], rng)
    assert kills >= 1  # at least one kill landed while it ran
    assert killed.read_bytes() == whole.read_bytes()
    ids = [r["id"] for r in read_lines(killed)]
    assert ids == [r["id"] for r in records]  # each document once, in input order


def test_a_torn_last_line_is_dropped_on_resume(weights, tmp_path, capsys):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i} " * (i % 5 + 1)} for i in range(300)])
    whole, torn = tmp_path / "whole.jsonl", tmp_path / "torn.jsonl"
    argv = ["score-corpus", str(inputs), "--model", str(path)]
    assert run(argv + ["--out", str(whole)]) == 0
    data = whole.read_bytes()
    for cut in (len(data) // 3, len(data) // 2 + 7, len(data) - 1):  # mid-chunk, mid-line, the last newline
        torn.write_bytes(data[:cut])
        (tmp_path / "torn.jsonl.run.json").write_bytes((tmp_path / "whole.jsonl.run.json").read_bytes())
        assert run(argv + ["--out", str(torn)]) == 0
        assert "resuming" in capsys.readouterr().err
        assert torn.read_bytes() == data


def test_the_output_is_never_its_own_input_and_edited_inputs_are_refused(weights, tmp_path, capsys):
    path = weights[0]
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": f"document {i}"} for i in range(70)])
    out = folder / "scores.jsonl"  # inside the folder it scores
    argv = ["score-corpus", str(folder), "--out", str(out), "--model", str(path)]
    assert run(argv) == 0
    first = out.read_bytes()
    assert run(argv) == 0  # a second run finds the output in the folder, and leaves it out
    assert "is complete: all 70 documents" in capsys.readouterr().err and out.read_bytes() == first
    assert run(["score-corpus", str(out), "--out", str(out), "--model", str(path)]) == 1
    assert "is the output file (--out); it cannot be an input too" in capsys.readouterr().err
    with open(folder / "a.jsonl", "a", encoding="utf-8") as f:  # the corpus grows: not the run recorded
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert run(argv) == 1
    assert "differ in input_files" in capsys.readouterr().err and out.read_bytes() == first


def test_ray_only_options_need_ray(weights, tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    assert run(["score-corpus", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--workers", "4",
                "--model", str(weights[0])]) == 2
    assert "--workers and --threads-per-worker choose Ray's actors; they need --ray" in capsys.readouterr().err
