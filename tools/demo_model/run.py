"""A training run, from the corpus to model.dat and the log: set up or resume, step, evaluate, write.

PyTorch on the CPU (bfloat16 autocast where the CPU has bfloat16 instructions), seeded, in a fixed data
order, so that the same command with the same thread count on the same machine writes the same model.dat.
A checkpoint (safetensors, no pickle) is written at every evaluation, and the same command run again
resumes from it, so a run can span several sittings. Progress goes to stdout and to the log, the source
of the model card's numbers. The weights are written with picogpt's ModelFileWriter, then reloaded by
picogpt for the held-out perplexity and the sample continuations.
"""

import hashlib
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import picogpt
from picogpt.modelfile import ModelFileWriter, open_model_file
from picogpt.tokenizer import load_tokenizer

from . import training
from .corpus import collect, docs_version, held_out_openings, is_held_out, opening
from .judging import greedy_loops_line, sample_line, sample_prompts
from .prefixes import UL_OPENING, UL_PREFIX, Prefixes
from .sequence_level import (BEST_OF_GENERIC, BEST_OF_TEMPERATURE, BEST_OF_TOP_K, N_LOOP_OPENINGS, UL_CONTINUATION,
                             UL_EVERY, UL_LR, UL_PLATEAU, UnlikelihoodSchedule, best_sample_loss, looping_openings,
                             margin_unlikelihood_loss, unlikelihood_loss)
from .training import (BATCH_SIZE, BLOCK_SIZE, DECAY_FRACTION, DROPOUT, EVAL_EVERY, EVAL_WINDOWS, HPARAMS, LR,
                       MAX_FILE_BYTES, MIN_LR, PATIENCE, PLATEAU, WARMUP, WEIGHT_DECAY, WEIGHT_DTYPE, Schedule)


class Log:
    """Each line to stdout and to the log file."""

    def __init__(self, path, append):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def __call__(self, message=""):
        print(message, flush=True)
        self.file.write(message + "\n")
        self.file.flush()


def sha256_16(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_settings(args, digest):
    """What a checkpoint must have been made with to be resumed: the fixed settings, the corpus, and the
    flags that change the steps."""
    settings = dict(hparams=HPARAMS, weight_dtype=WEIGHT_DTYPE, batch=[BATCH_SIZE, BLOCK_SIZE], lr=[LR, MIN_LR, WARMUP],
                    weight_decay=WEIGHT_DECAY, schedule=[PLATEAU, PATIENCE, DECAY_FRACTION, EVAL_EVERY],
                    seed=args.seed, tokens=digest)
    if args.unlikelihood_from:  # and the weights it starts from, and the flags that shape the steps
        steps = dict(start=sha256_16(args.unlikelihood_from), lr=UL_LR, prefix=UL_PREFIX, continuation=UL_CONTINUATION,
                     every=UL_EVERY, plateau=UL_PLATEAU, openings=N_LOOP_OPENINGS)
        shaped_by = dict(
            margin=args.unlikelihood_margin, margin_among=args.unlikelihood_margin_among,
            nonsense=args.unlikelihood_nonsense, early_end=args.unlikelihood_early_end or None,
            best_of=args.unlikelihood_best_of and [args.unlikelihood_best_of, BEST_OF_TEMPERATURE, BEST_OF_TOP_K,
                                                   BEST_OF_GENERIC, "reference"],  # sampled from, as recorded before
            reference=args.unlikelihood_reference and sha256_16(args.unlikelihood_reference),
            prefixes=[args.unlikelihood_prefixes, UL_OPENING] if args.unlikelihood_prefixes != "windows" else None)
        settings["unlikelihood"] = steps | {name: value for name, value in shaped_by.items() if value is not None}
    if args.token_unlikelihood is not None:
        settings["token_unlikelihood"] = args.token_unlikelihood
    return settings


def token_level_text(args):
    return (f" token-level unlikelihood (weight {args.token_unlikelihood}) on the window's earlier tokens"
            if args.token_unlikelihood else "")


def sequence_level_text(args, start):
    """The sequence-level steps in one sentence, for the log."""
    held_to = args.unlikelihood_reference or "the starting model"  # the model the steps are held to
    if args.unlikelihood_margin is not None:
        on_repeats = (f"pushes each token that repeats a four-token phrase {args.unlikelihood_margin:g} nats "
                      f"below the model's best other choice (a hinge on the logits)")
        if args.unlikelihood_margin_among is not None:
            on_repeats += f" among {held_to}'s {args.unlikelihood_margin_among} likeliest tokens"
        if args.unlikelihood_nonsense is not None:
            on_repeats += f", and so each token that {held_to} gives p < {args.unlikelihood_nonsense:g}"
        if args.unlikelihood_early_end:
            on_repeats += ", and each <|endoftext|> that ends a continuation before it completes a sentence"
    else:
        on_repeats = "lowers the probability of each token that repeats a four-token phrase"
    best_of_text = ""
    if args.unlikelihood_best_of is not None:
        best_of_text = (f"; and it samples {args.unlikelihood_best_of} continuations of each from {held_to} "
                        f"(temperature {BEST_OF_TEMPERATURE}, top-k {BEST_OF_TOP_K}) and trains on the best of "
                        f"those that end after a complete sentence without repeating a phrase"
                        + (" or holding nonsense" if args.unlikelihood_nonsense is not None else "")
                        + f": the highest mean log-probability {held_to} gives it after the prefix, less "
                        f"{BEST_OF_GENERIC} times that after <|endoftext|> alone")
    prefix_texts = {"windows": f"training windows of {UL_PREFIX} tokens",
                    "openings": f"training documents' first {UL_OPENING} tokens",
                    "sentences": f"training documents' first {UL_OPENING} tokens, or every other time their first "
                                 f"sentence (up to {UL_PREFIX} tokens, one length in a batch),"}
    continued = prefix_texts[args.unlikelihood_prefixes]
    token_level = token_level_text(args)
    return (f"from {args.unlikelihood_from} (sha256 {start}), a fresh AdamW at lr {UL_LR}: one step in {UL_EVERY} "
            f"continues {BATCH_SIZE} {continued} greedily for {UL_CONTINUATION} tokens and {on_repeats}{best_of_text}"
            "; the others are next-token steps" + (" with" + token_level if token_level else "")
            + f"; until the greedy continuations of {N_LOOP_OPENINGS} training docstring openings that loop fall "
            f"by fewer than {UL_PLATEAU} over {PATIENCE} evaluations, at most {args.max_steps} steps")


def train(args):
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    file_size = ModelFileWriter(args.out, HPARAMS, weight_dtype=WEIGHT_DTYPE).file_size  # the layout; opens nothing
    assert file_size <= MAX_FILE_BYTES, f"{file_size} bytes is over the {MAX_FILE_BYTES} byte limit"
    encoding = load_tokenizer()
    corpus = collect(args.docs, encoding)
    train_stream, val_stream = corpus.train, corpus.val

    mkldnn = torch.ops.mkldnn
    native_bf16 = hasattr(mkldnn, "_is_mkldnn_bf16_supported") and mkldnn._is_mkldnn_bf16_supported()
    precision = {"auto": "bf16" if native_bf16 else "fp32"}.get(args.precision, args.precision)
    settings = run_settings(args, corpus.digest)
    model = training.new_model()
    n_params = sum(t.numel() for t in model.parameters())  # the tied lm_head counts once
    optimizer = training.adamw(model)
    batches = torch.Generator().manual_seed(args.seed)  # the data order: random offsets, fixed by the seed
    schedule = UnlikelihoodSchedule(args.max_steps) if args.unlikelihood_from else Schedule(args.max_steps)
    step, trained_s = 0, 0.0

    # Resume: the same command from its checkpoint, or --continue-from the weights before a decay.
    if args.continue_from and not Path(args.continue_from).is_file():
        sys.exit(f"error: no checkpoint {args.continue_from} to continue from")
    source = args.continue_from or args.checkpoint
    resume = Path(source).is_file() and (not args.fresh or bool(args.continue_from))
    if resume:
        state = training.load_checkpoint(source, model, optimizer, batches)
        if state["settings"] != settings:
            sys.exit(f"error: {source} was made with other settings or another corpus; "
                     f"run with --fresh to start again")
        step, trained_s, precision = state["step"], state["trained_s"], state["precision"]
        train_loss, val_loss = state.get("train_loss"), state.get("val_loss")  # the last evaluation's
        if args.continue_from:  # the weights from before the decay, and the constant rate again
            state["decay_start"] = state["decay_steps"] = None
        if args.unlikelihood_from:
            schedule = UnlikelihoodSchedule(args.max_steps, state["loop_counts"], state["stopped_at"])
        else:
            schedule = Schedule(args.max_steps, state["decay_start"], state["decay_steps"], state["val_losses"])
        if state["threads"] != args.threads:
            print(f"note: the checkpoint trained on {state['threads']} threads, this run on {args.threads}; "
                  f"the result will differ slightly from an uninterrupted run", file=sys.stderr)
    reference = None  # the frozen model the sequence-level steps are held to
    if args.unlikelihood_from:
        trained = open_model_file(args.unlikelihood_from)
        if trained.hparams != HPARAMS:
            sys.exit(f"error: {args.unlikelihood_from} is not the demo model's shape ({trained.hparams})")
        if not resume:  # where the model starts, with a fresh AdamW (a resumed run's weights are the checkpoint's)
            training.load_weights(model, trained)
        if (args.unlikelihood_margin_among is not None or args.unlikelihood_nonsense is not None
                or args.unlikelihood_best_of is not None):  # the starting model or --unlikelihood-reference
            held_to = open_model_file(args.unlikelihood_reference) if args.unlikelihood_reference else trained
            if held_to.hparams != HPARAMS:
                sys.exit(f"error: {args.unlikelihood_reference} is not the demo model's shape ({held_to.hparams})")
            reference = training.frozen_model(held_to)
    bf16 = precision == "bf16"

    log = Log(args.log, append=resume or bool(args.unlikelihood_from))
    command = " ".join([Path(sys.executable).name, "-m", __package__, *sys.argv[1:]])
    environment = (f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} threads, "
                   f"{platform.machine()}, products in {precision} (native bfloat16: {'yes' if native_bf16 else 'no'})")
    if args.unlikelihood_from and not resume:
        log(f"unlikelihood: {command}")
        log(environment)
        log(f"corpus: {docs_version(args.docs)}; tokens sha256 {corpus.digest}")  # the next-token steps' and openings'
        log(sequence_level_text(args, settings["unlikelihood"]["start"]))
    elif resume:
        log(f"resumed: step {step} from {source}{' with the decay undone' if args.continue_from else ''} ({command})")
    else:
        log(f"command: {command}")
        log(environment)
        log(f"corpus: {len(corpus.docstrings)} docstrings from {sysconfig.get_paths()['stdlib']}; "
            f"{len(corpus.docs) - len(corpus.docstrings)} documents from {docs_version(args.docs)}")
        log(f"split: train {len(corpus.train_docs)} documents, {len(train_stream)} tokens; held out "
            f"{len(corpus.val_docs)} documents, {len(val_stream)} tokens; tokens sha256 {corpus.digest}")
        log(f"model: {HPARAMS}, {n_params} parameters, model.dat {file_size} bytes ({WEIGHT_DTYPE} matrices)")
        log(f"training: {BATCH_SIZE} x {BLOCK_SIZE} tokens a step, AdamW lr {LR} (warm-up {WARMUP}, then constant "
            f"until the held-out loss improves by less than {PLATEAU} over {PATIENCE} evaluations, then a linear "
            f"decay to {MIN_LR} over {DECAY_FRACTION:.0%} of the steps), weight decay {WEIGHT_DECAY}, dropout "
            f"{DROPOUT}, grad clip 1.0, seed {args.seed}, at most {args.max_steps} steps"
            + (";" + token_level_text(args) if args.token_unlikelihood else ""))

    # What each evaluation measures: fixed windows for the losses, training openings for the loops.
    train_windows = training.fixed_windows(train_stream, EVAL_WINDOWS)
    val_windows = training.fixed_windows(val_stream, EVAL_WINDOWS)
    train_docstrings = [d for d in corpus.docstrings if not is_held_out(d)]
    loop_openings = [encoding.encode(opening(train_docstrings[i]))
                     for i in np.linspace(0, len(train_docstrings) - 1, N_LOOP_OPENINGS).astype(int)]
    prefixes = Prefixes(args.unlikelihood_prefixes, train_stream, encoding)
    if args.unlikelihood_prefixes == "sentences":
        if not prefixes.sentences:
            sys.exit(f"error: no training document has a first sentence within {UL_PREFIX} tokens to continue; "
                     f"use --unlikelihood-prefixes openings")
        if not resume:
            log(f"first sentences: {sum(map(len, prefixes.sentences.values()))} of the {len(corpus.train_docs)} "
                f"training documents have one within {UL_PREFIX} tokens")

    checkpoint = Path(args.checkpoint)
    fewest_loops_checkpoint = checkpoint.with_suffix(".best.safetensors")
    losses, unlikelihood_losses, best_of_losses, t_sitting = [], [], [], time.perf_counter()
    while schedule.end is None or step < schedule.end:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        if args.unlikelihood_from and step % UL_EVERY == UL_EVERY - 1:  # a sequence-level step
            batch = prefixes.batch(step // UL_EVERY, batches)
            if args.unlikelihood_margin is not None:
                loss = margin_unlikelihood_loss(model, batch, bf16, args.unlikelihood_margin, reference,
                                                among=args.unlikelihood_margin_among,
                                                nonsense=args.unlikelihood_nonsense,
                                                encoding=encoding if args.unlikelihood_early_end else None)
            else:
                loss = unlikelihood_loss(model, batch, bf16)
            unlikelihood_losses.append(loss.item())
            if args.unlikelihood_best_of is not None:
                best_of = best_sample_loss(model, reference, batch, bf16, args.unlikelihood_best_of, encoding,
                                           batches, args.unlikelihood_nonsense)
                best_of_losses.append(best_of.item())
                loss = loss + best_of
        else:  # a next-token step
            loss = training.lm_loss(model, training.random_windows(train_stream, BLOCK_SIZE, batches, with_next=True),
                                    bf16, args.token_unlikelihood or 0.0)
            losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % EVAL_EVERY != 0 and step != schedule.end:
            continue
        train_loss = training.evaluate(model, train_windows, bf16)
        val_loss = training.evaluate(model, val_windows, bf16)
        elapsed = trained_s + time.perf_counter() - t_sitting
        state = dict(settings=settings, step=step, trained_s=elapsed, precision=precision, threads=args.threads,
                     train_loss=train_loss, val_loss=val_loss)
        if args.unlikelihood_from:  # the loops decide when to stop
            loops, unfinished = looping_openings(model, loop_openings, encoding)
            log(f"step {step:5d} | lr {schedule.lr(step - 1):.2e} | batch loss {np.mean(losses):.4f} "
                f"| unlikelihood loss {np.mean(unlikelihood_losses):.4f} "
                + (f"| best-of loss {np.mean(best_of_losses):.4f} " if best_of_losses else "")
                + f"| train loss {train_loss:.4f} | val loss {val_loss:.4f} | loops {loops}/{len(loop_openings)} "
                f"| unfinished {unfinished}/{len(loop_openings)} | {elapsed:6.0f} s")
            losses, unlikelihood_losses, best_of_losses = [], [], []
            why = schedule.evaluated(step, loops)
            state.update(loop_counts=schedule.loop_counts, stopped_at=schedule.stopped_at)
            if why:
                log(f"stop: at step {step}, because {why}")
            if schedule.fewest_loops_step == step:  # for --keep fewest-loops, now or when the run is over
                training.save_checkpoint(fewest_loops_checkpoint, model, optimizer, batches, state)
        else:  # the held-out loss decides when to decay
            log(f"step {step:5d} | lr {schedule.lr(step - 1):.2e} | batch loss {np.mean(losses):.4f} "
                f"| train loss {train_loss:.4f} | val loss {val_loss:.4f} | {elapsed:6.0f} s")
            losses = []
            why = schedule.evaluated(step, val_loss)
            state.update(decay_start=schedule.decay_start, decay_steps=schedule.decay_steps,
                         val_losses=schedule.val_losses)
            if why:
                log(f"decay: from step {step} over {schedule.decay_steps} steps, because {why}")
                # The weights before any decay: --continue-from it trains on at the constant rate, further
                stable = checkpoint.with_suffix(".stable.safetensors")
                training.save_checkpoint(stable, model, optimizer, batches, state)
                log(f"saved {stable}: train on from here with --continue-from {stable} --max-steps N")
        training.save_checkpoint(checkpoint, model, optimizer, batches, state)
    elapsed = trained_s + time.perf_counter() - t_sitting
    if args.keep == "fewest-loops" and schedule.fewest_loops_step != step:
        if not fewest_loops_checkpoint.is_file():
            sys.exit(f"error: no {fewest_loops_checkpoint} with the weights of step {schedule.fewest_loops_step}; "
                     f"write the last evaluation's without --keep")
        kept = training.load_checkpoint(fewest_loops_checkpoint, model, optimizer, batches)
        if kept["settings"] != settings or kept["step"] != schedule.fewest_loops_step:
            sys.exit(f"error: {fewest_loops_checkpoint} is not step {schedule.fewest_loops_step} of this run; "
                     f"write the last evaluation's without --keep")
        step, train_loss, val_loss = kept["step"], kept["train_loss"], kept["val_loss"]
        log(f"kept: step {step}, at which {kept['loop_counts'][-1]} of {N_LOOP_OPENINGS} training openings looped, "
            f"the fewest of the run (--keep fewest-loops; {fewest_loops_checkpoint})")

    training.write_model(model, args.out)
    log(f"final: step {step}, train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
        f"training {elapsed:.0f} s; wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    report(args, corpus, encoding, log)
    log(f"done: {time.perf_counter() - started:.0f} s in this sitting")
    log.file.close()


def report(args, corpus, encoding, log):
    """What the log ends with, from picogpt reading the file just written: the held-out perplexity (and
    --compare's), the greedy samples, and the loop counts over every held-out opening."""
    n_tokens, perplexity = training.held_out_perplexity(args.out, corpus.val_docs, encoding)
    log(f"held-out perplexity (picogpt, {n_tokens} tokens of {len(corpus.val_docs)} documents): {perplexity:.2f} for "
        f"{args.out}")
    if args.compare:
        compared = training.held_out_perplexity(args.compare, corpus.val_docs, encoding)[1]
        log(f"held-out perplexity (picogpt, same text): {compared:.2f} for {args.compare}")
    demo = picogpt.load(args.out, quiet=True)
    openings = held_out_openings(corpus.docstrings)
    for prompt in sample_prompts(openings):
        log(sample_line(demo, prompt, encoding))
    for path in [args.out] + ([args.compare] if args.compare else []):
        log(greedy_loops_line(path, openings, encoding))
