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
import tempfile
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
    capsys.readouterr()
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", str(path), "--stride", "8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "was made with other settings (stride: none then, 8 now); give the same options" in err
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", "demo"]) == 1
    assert f"was made with another model ({path.resolve()}); give that model to resume it" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(["score-corpus", str(inputs), "--out", str(out), "--model", str(path)]) == 0
    assert "is complete: all 5 documents are in it" in capsys.readouterr().err
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("precious\n")
    assert run(["score-corpus", str(inputs), "--out", str(foreign), "--model", str(path)]) == 1
    err = capsys.readouterr().err
    assert "was not written by this command" in err and "remove" not in err and foreign.read_text() == "precious\n"
    for bad in (["nothing*.jsonl"], [str(tmp_path / "missing.jsonl")], [str(tmp_path / "out.jsonl.run.json")]):
        assert run(["score-corpus", *bad, "--out", str(tmp_path / "x.jsonl"), "--model", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "nothing matches" in err or "does not exist" in err or "expected a .jsonl" in err


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

    real_start = corpus.CorpusOutput.start

    def start_on_a_filling_disk(self):
        real_start(self)
        self._file = FillingDisk(self._file)
    monkeypatch.setattr(corpus.CorpusOutput, "start", start_on_a_filling_disk)
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
        # (stdout into a temporary file, not the machine's /dev/null: a test writes to no real device)
        process = subprocess.Popen([sys.executable, "-m", "picogpt", *argv], stdout=tempfile.TemporaryFile(),
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
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.jsonl has grown since it was begun" in err and "run the same command" not in err
    assert "give another --out to run the inputs as they are now" in err and out.read_bytes() == first


def test_ray_only_options_need_ray(weights, tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    assert run(["score-corpus", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--workers", "4",
                "--model", str(weights[0])]) == 2
    assert "--workers and --threads-per-worker choose Ray's actors; they need --ray" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Nothing a user types breaks a run (issue 35): outputs that are not files, memory, text that is not
# valid Unicode, inputs named two ways, runs that cannot start

def test_a_pipe_or_a_character_device_is_written_through_and_never_replaced(weights, tmp_path, capsys, monkeypatch):
    import stat
    import threading
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i % 5 + 1)} for i in range(150)])
    argv = ["score-corpus", str(inputs), "--model", str(path), "--threads", "1"]
    assert run(argv + ["--out", str(tmp_path / "file.jsonl")]) == 0
    capsys.readouterr()

    fifo = tmp_path / "fifo"  # a named pipe: the lines come through it, in order, as in the file
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run(argv + ["--out", str(fifo)]) == 0
    reader.join(timeout=60)
    assert got == [(tmp_path / "file.jsonl").read_bytes()]
    err = capsys.readouterr().err
    assert f"{fifo} is a named pipe, not a file: the lines go through it as they are done" in err
    assert f"all 150 went through {fifo}" in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "fifo.run.json").exists()

    # The reader goes away (| head -1): quietly, status 141, as a shell tool.
    reader = threading.Thread(target=lambda: open(fifo, "rb").close(), daemon=True)
    reader.start()
    real_start = corpus.CorpusOutput.start

    def start_then_lose_the_reader(self):
        real_start(self)
        reader.join(timeout=60)  # the reader has opened the pipe and closed it again
    monkeypatch.setattr(corpus.CorpusOutput, "start", start_then_lose_the_reader)
    assert run(argv + ["--out", str(fifo)]) == 141
    assert "error" not in capsys.readouterr().err and stat.S_ISFIFO(os.stat(fifo).st_mode)
    monkeypatch.undo()

    # Character devices of our own (never the machine's): a null device takes everything, a full one refuses.
    try:
        os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(tmp_path / "full", 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    except OSError:
        pytest.skip("making device nodes needs root (CAP_MKNOD)")
    assert run(argv + ["--out", str(tmp_path / "null")]) == 0
    capsys.readouterr()
    assert run(argv + ["--out", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"picogpt score-corpus: error: cannot write {tmp_path / 'full'}: No space left on device; a "
                       f"stream cannot be resumed: give a file name (a resumable output) or another device")
    for name in ("null", "full"):  # still the devices, with nothing beside them
        assert stat.S_ISCHR(os.stat(tmp_path / name).st_mode) and not (tmp_path / f"{name}.run.json").exists()


def test_a_disk_a_socket_or_a_record_that_is_not_a_file_is_refused_in_one_line(weights, tmp_path, capsys):
    import socket
    import stat
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    argv = ["score-corpus", str(inputs), "--model", str(path), "--out"]
    refused = {}
    try:  # a block device node of a number no driver holds: refused before anything opens it
        os.mknod(tmp_path / "disk", 0o600 | stat.S_IFBLK, os.makedev(240, 240))
        refused["disk"] = "is a block device (a disk), not a file: the lines would be written over it"
    except OSError:
        pass
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        refused["sock"] = "is a socket, not a file; give a file name"
        (tmp_path / "out.jsonl.run.json").mkdir()  # where the output's record would go
        refused["out.jsonl"] = "out.jsonl.run.json is a folder, not a file, so the record of"
        for name, message in refused.items():
            assert run(argv + [str(tmp_path / name)]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err and "remove" not in err, err
    assert stat.S_ISSOCK(os.stat(tmp_path / "sock").st_mode) and (tmp_path / "out.jsonl.run.json").is_dir()
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d.jsonl", "out.jsonl.run.json", "sock", *(
        ["disk"] if "disk" in refused else [])])


def test_an_empty_file_such_as_a_shells_redirection_is_taken_as_a_new_output(weights, tmp_path, monkeypatch):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"")  # `> out.jsonl`, or --out /dev/stdout with stdout sent to a file
    real_run = corpus.CorpusJob.run

    def interrupted(self, docs, on_batch=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus.CorpusJob, "run", interrupted)  # stopped at once: the empty file stays, as it was
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(out)]) == 130
    assert out.read_bytes() == b"" and not (tmp_path / "out.jsonl.run.json").exists()
    monkeypatch.setattr(corpus.CorpusJob, "run", real_run)
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(out)]) == 0
    assert len(read_lines(out)) == 3 and (tmp_path / "out.jsonl.run.json").exists()


def test_batches_too_large_for_memory_are_refused_before_any_work(weights, tmp_path, capsys, monkeypatch):
    from picogpt import memory
    path, model, _ = weights
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": text_of(random.Random(i), 30)} for i in range(40)])
    out = tmp_path / "out.jsonl"
    # Scoring: 32 rows of the context's 64 tokens keep 32 x 64 x 50257 float32 logits, 412 MB; completing
    # 32 rows of 44 tokens + 20 keeps generate's per-step logits and their float64 copies, 113 MB.
    for task, available in (("score-corpus", 300e6), ("complete-corpus", 100e6)):
        monkeypatch.setattr(memory, "available_memory", lambda: available)
        argv = [task, str(inputs), "--model", str(path), "--out", str(out)]
        assert run(argv + ["--batch-tokens", "100000000"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--batch-tokens 100000000 lets a batch hold 32 documents of up to " in err
        assert f"but {available / 1e6:.0f} MB is available; give a smaller --batch-tokens (at most " in err
        assert not out.exists() and not (tmp_path / "out.jsonl.run.json").exists()
    fits = int(err.split("(at most ")[1].split()[0])
    argv = ["complete-corpus", str(inputs), "--model", str(path), "--out", str(out)]
    assert run(argv + ["--batch-tokens", str(fits)]) == 0
    monkeypatch.setattr(memory, "available_memory", lambda: 300e6)  # the Python API checks the same
    with pytest.raises(corpus.PicogptError, match="at most 1424 fits"):  # its largest batch: 22 rows of 64 tokens
        corpus.CorpusJob(model, "score", batch_tokens=4096)
    assert corpus.CorpusJob(model, "score", batch_tokens=1424).largest_batch()[0] <= 300e6
    monkeypatch.setattr(memory, "available_memory", lambda: 10e6)  # not even one document
    with pytest.raises(corpus.PicogptError, match="a document of 64 tokens needs about 26 MB .* even alone in its "
                                                  "batch; free some memory or use a smaller model"):
        corpus.CorpusJob(model, "score", batch_tokens=1)


def test_text_and_names_that_are_not_valid_unicode_become_error_lines_or_escapes(weights, tmp_path, capsys):
    path = weights[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "s.jsonl").write_text('{"id": "\\ud800", "text": "hello"}\n{"id": 2, "text": "bad \\udc80 text"}\n'
                                    '{"id": 3, "text": "caf\\u00e9 au lait"}\n', encoding="ascii")
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("a document in a file named in Latin-1", encoding="utf-8")
    (folder / os.fsdecode(b"n\xff.jsonl")).write_text('{"text": "in a file named with byte 0xff"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["score-corpus", str(folder), "--model", str(path), "--out", str(out)]
    assert run(argv) == 0
    data = out.read_bytes()
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]  # strict UTF-8, valid JSON
    assert [r["id"] for r in records] == [f"{folder}/caf\\xe9.txt", f"{folder}/n\\xff.jsonl:1", "\ud800", 2, 3]
    assert records[3]["error"] == "the 'text' field is not valid Unicode (a lone surrogate \\udc80 at character 4)"
    assert all("error" not in r for r in records[:3] + records[4:])
    assert b'"id": "\\ud800"' in data  # the record's id as its input spelled it
    (tmp_path / "out.jsonl.run.json").read_bytes().decode("utf-8")  # the record of the run is UTF-8 too
    assert "1 document with an error field" in capsys.readouterr().err
    assert run(argv) == 0 and "is complete" in capsys.readouterr().err  # and the same command finds it finished


def test_inputs_named_two_ways_are_one_and_earlier_outputs_are_never_inputs(weights, tmp_path, capsys, monkeypatch):
    path = weights[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "web").mkdir()
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": f"document {i}"} for i in range(100)])
    assert run(["score-corpus", "web/a.jsonl", "--model", str(path), "--out", "web/old.jsonl"]) == 0
    whole = (tmp_path / "web" / "old.jsonl").read_bytes()
    capsys.readouterr()
    argv = ["score-corpus", "./web/", "--model", str(path), "--out", "scores.jsonl"]
    assert run(argv) == 0  # web/old.jsonl, an output with its .run.json, is left out
    err = capsys.readouterr().err
    assert "left out 1 earlier output of a corpus run found among the inputs" in err and "web/old.jsonl" in err
    assert (tmp_path / "scores.jsonl").read_bytes() == whole
    lines = whole.splitlines(keepends=True)
    (tmp_path / "scores.jsonl").write_bytes(b"".join(lines[:70]))  # cut short: resumed under the other spelling
    assert run(["score-corpus", "web", "--model", str(path), "--out", "./scores.jsonl"]) == 0
    assert "resuming" in capsys.readouterr().err and (tmp_path / "scores.jsonl").read_bytes() == whole
    assert run(["score-corpus", "web/old.jsonl", "--model", str(path), "--out", "x.jsonl"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "web/old.jsonl is the output of an earlier corpus run" in err


def test_a_text_field_that_no_record_has_stops_the_job_in_one_line(weights, tmp_path, capsys):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "body": f"text {i}", "lang": "en"} for i in range(100)])
    out = tmp_path / "out.jsonl"
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"none of the first 64 records of {inputs} has a 'text' field (they have 'body', "
                                     f"'lang'); give --text-field the field that holds the text") in err
    assert not out.exists() and not (tmp_path / "out.jsonl.run.json").exists()
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(out), "--text-field", "body"]) == 0


def test_the_backend_recorded_is_the_one_that_ran(weights, tmp_path, capsys):
    """--backend auto records its choice: an output begun with --backend numpy (the default before auto) resumes
    under auto on a float32 model, and one begun on another backend is refused, naming both."""
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i} " * (i % 5 + 1)} for i in range(150)])
    out, record = tmp_path / "out.jsonl", tmp_path / "out.jsonl.run.json"
    argv = ["score-corpus", str(inputs), "--model", str(path), "--out", str(out), "--threads", "1"]
    assert run(argv + ["--backend", "numpy"]) == 0
    whole = out.read_bytes()
    assert json.loads(record.read_text())["settings"]["backend"] == "numpy"
    out.write_bytes(whole[:len(whole) // 2])
    assert run(argv) == 0 and out.read_bytes() == whole  # auto: numpy for float32 weights
    settings = json.loads(record.read_text())
    settings["settings"]["backend"] = "mkl"
    record.write_text(json.dumps(settings))
    out.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert run(argv) == 1
    assert 'was made with other settings (backend: "mkl" then, "numpy" now)' in capsys.readouterr().err


def test_the_thread_count_is_recorded_and_a_resume_at_another_is_refused(weights, tmp_path, capsys):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i} " * (i % 5 + 1)} for i in range(150)])
    out, record = tmp_path / "out.jsonl", tmp_path / "out.jsonl.run.json"
    argv = ["score-corpus", str(inputs), "--model", str(path), "--out", str(out)]
    assert run(argv + ["--threads", "1"]) == 0
    whole = out.read_bytes()
    assert json.loads(record.read_text())["settings"]["threads"] == 1
    out.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert run(argv + ["--threads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"{out} was made with 1 BLAS threads and this run has 2 (a score may then differ "
                                     f"in its last digits); give --threads 1 (on Ray: --threads-per-worker 1)") in err
    assert run(argv + ["--threads", "1"]) == 0 and out.read_bytes() == whole
    # An output begun before thread counts were recorded resumes at any count, saying so.
    settings = json.loads(record.read_text())
    del settings["settings"]["threads"]
    record.write_text(json.dumps(settings))
    out.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert run(argv + ["--threads", "2"]) == 0
    assert "was begun by an earlier picogpt, which did not record its BLAS thread count: resuming with 2" in \
        capsys.readouterr().err
    assert [r["id"] for r in read_lines(out)] == [r["id"] for r in read_lines(tmp_path / "out.jsonl")]


def test_the_progress_bar_moves_batch_by_batch(weights, tmp_path, monkeypatch):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i % 9 + 1)} for i in range(100)])
    moves = []
    real_advance = corpus.Progress.advance
    monkeypatch.setattr(corpus.Progress, "advance",
                        lambda self, n_docs, n_tokens: (moves.append(n_docs), real_advance(self, n_docs, n_tokens)))
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(tmp_path / "o.jsonl"),
                "--batch-tokens", "128"]) == 0
    assert len(moves) > 4 and sum(moves) == 100 and max(moves) < corpus.CHUNK_DOCS


def test_a_job_stopped_before_its_first_chunk_leaves_nothing(weights, tmp_path, capsys, monkeypatch):
    path = weights[0]
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i}"} for i in range(10)])

    def interrupted(self, docs, on_batch=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus.CorpusJob, "run", interrupted)
    assert run(["score-corpus", str(inputs), "--model", str(path), "--out", str(tmp_path / "o.jsonl")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_a_document_that_cannot_be_continued_gets_an_error_line_and_the_run_goes_on(weights, tmp_path, capsys,
                                                                                      monkeypatch):
    path = weights[0]
    texts = [f"a document {i}" for i in range(6)]
    texts[3] = "poison pill"
    inputs = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    real = corpus.generate_batch
    poison = encode("poison pill")

    def generate_batch(model, prompts, n_tokens, **options):  # what a sampler might raise for one document
        if poison in prompts:
            raise ValueError("probabilities contain NaN")
        return real(model, prompts, n_tokens, **options)
    monkeypatch.setattr(corpus, "generate_batch", generate_batch)
    out = tmp_path / "out.jsonl"
    assert run(["complete-corpus", str(inputs), "--model", str(path), "--out", str(out), "-n", "4"]) == 0
    records = read_lines(out)
    assert records[3]["error"] == "cannot continue it: probabilities contain NaN"
    assert all("completion" in r for i, r in enumerate(records) if i != 3)
    write_jsonl(inputs, [{"text": "poison pill"}] * 3)  # every document fails: the settings, not the documents
    capsys.readouterr()
    argv = ["complete-corpus", str(inputs), "--model", str(path), "-n", "4"]
    assert run(argv + ["--out", str(tmp_path / "o2.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "continuing fails for every document of the chunk: probabilities contain NaN" in err
    assert not (tmp_path / "o2.jsonl").exists()
