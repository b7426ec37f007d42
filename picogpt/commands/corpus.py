"""picogpt score-corpus and complete-corpus: score or continue every document of many files, resumably, in
this process or on a Ray cluster (--ray)."""

import sys
from pathlib import Path

from .. import blas, corpus
from ..errors import BadArgument, PicogptError, plural, shown
from ..modelfile import open_model_file
from ..outputs import output_file
from .arguments import (ArgumentParser, add_model_arguments, add_sampling_arguments, load_model, positive_int,
                        rule_options, sampling_settings)


def corpus_parser(prog, task):
    what = "Score every document" if task == "score" else "Continue every document"
    p = ArgumentParser(prog=prog, description=f"{what} of a corpus: .jsonl files (the text in a field), .txt files "
                       "(one document each, or one per line), folders and glob patterns, streamed, batched by length. "
                       "Writes one JSON line per document, in input order, appended as it goes: the same command "
                       "run again after a crash skips what is done and finishes the rest.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl or .txt files, folders of them, glob patterns")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the JSON-lines output (resumed if it exists); a pipe or a device such as /dev/stdout is "
                        "written through as the lines come, without resuming")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the field of a .jsonl record that holds "
                   "the text (default: text); an \"id\" field is carried over when present")
    p.add_argument("--lines", action="store_true", help=".txt files hold one document per line (default: one per file)")
    if task == "score":
        p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                       help="a document longer than the context is scored in windows that move N tokens "
                            "(default: half the context)")
    else:
        p.add_argument("-n", "--n-tokens", type=positive_int, default=20, metavar="N",
                       help="new tokens per document at most; a document ends early at <|endoftext|> (default: 20)")
        add_sampling_arguments(p, seed_help="seed for sampling, with each document's place (default: random, "
                               "recorded in OUT.run.json and reused when the run is resumed)",
                               title="sampling (default: greedy; --top-k, --top-p or --seed without --temperature "
                                     "sample at 1; each document has its own random stream)")
        p.add_argument("--ids", action="store_true", help="also write the new tokens' ids")
    p.add_argument("--batch-tokens", type=positive_int, default=corpus.BATCH_TOKENS, metavar="N",
                   help=f"padded tokens per batch at most (default: {corpus.BATCH_TOKENS})")
    ray = p.add_argument_group("Ray (picogpt's ray extra)")
    ray.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run on the Ray cluster at ADDRESS (auto: the one this machine is in; local: start one "
                          "on this machine); the model file is needed on this machine only")
    ray.add_argument("--workers", type=positive_int, default=None, metavar="N", help="Ray actors (default: 2)")
    ray.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="T",
                     help="BLAS threads (and CPUs reserved) per actor (default: 1); an output is resumed at the "
                          "thread count that began it (--threads T in this process)")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's notes at info level, and its actors' output")
    add_model_arguments(p)
    return p


def corpus_command(args, task):
    if not args.ray and (args.workers is not None or args.threads_per_worker is not None):
        raise BadArgument("--workers and --threads-per-worker choose Ray's actors; they need --ray")
    out = output_file(args.out)  # a folder or a link is sorted out before anything else
    output = corpus.CorpusOutput(out)  # and a device or a pipe: streamed, or refused
    model = load_model(args, args.prog)
    job_options = dict(task=task, batch_tokens=args.batch_tokens)
    if task == "score":
        job_options["stride"] = args.stride
    else:
        temperature, seed = sampling_settings(args)
        recorded = output.recorded_settings()
        if args.seed is None and temperature > 0 and recorded and "sampling" in recorded:
            seed = recorded["sampling"].get("seed", seed)  # resuming a sampled run: its own seed
        sampling = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=seed if temperature > 0 else None)
        # the newer rules only when asked for, so that a run recorded before they existed resumes as it was
        sampling.update({k: v for k, v in rule_options(args).items() if k != "repetition_penalty" and v})
        job_options.update(n_tokens=args.n_tokens, sampling=sampling, ids=args.ids)
    job = corpus.CorpusJob(model, **job_options)  # the settings and the memory are checked before anything is written
    left_out = []
    chunks, input_files = corpus.plan(args.inputs, lines=args.lines, text_field=args.text_field,
                                      exclude=[out, output.run_path], with_files=True, left_out=left_out)
    if left_out:
        names = ", ".join(shown(p) for p in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
        print(f"{args.prog}: left out {plural(len(left_out), 'earlier output')} of a corpus run found among the "
              f"inputs (a .jsonl with its .run.json beside it): {names}", file=sys.stderr)
    bf16_native = bool(model.precision and model.precision.native)
    # The BLAS threads that compute each product: at another count a score may differ in its last digits.
    threads = (args.threads_per_worker or 1) if args.ray else blas.current().threads
    # The backend that runs the products (--backend auto's choice for this model, not "auto"): an output begun
    # when numpy was the default resumes under auto's numpy for a float32 model.
    ran_on = blas.current().name if args.backend == "auto" else args.backend
    # What made the output, recorded beside it: resuming with any of it changed is refused.
    # (Names as text that is valid Unicode: a name that is not UTF-8 is recorded with \xNN escapes.)
    output.settings = dict(job_options, model=shown(Path(model.path).resolve()),
                           model_sha256=open_model_file(model.path).sha256.hex(), backend=ran_on,
                           bf16_native=bf16_native, inputs=[shown(corpus.normal_input(i)) for i in args.inputs],
                           input_files=[[shown(f), f.stat().st_size] for f in input_files],  # an edited input
                           text_field=shown(args.text_field), lines=args.lines, chunk_docs=corpus.CHUNK_DOCS,
                           threads=threads)
    if args.ray:
        from ..corpus_ray import require_ray  # Ray is imported only with --ray
        require_ray()
    if not chunks:
        raise PicogptError(f"the inputs hold no documents: {' '.join(shown(i) for i in args.inputs)}")
    corpus.check_text_field(chunks)
    remaining = output.plan(chunks)  # checks the settings; nothing is written yet
    for note in output.notes:
        print(f"{args.prog}: {note}", file=sys.stderr)
    total = sum(c.n_docs for c in chunks)
    if not remaining:
        print(f"{args.prog}: {shown(output.path)} is complete: all {plural(total, 'document')} are in it",
              file=sys.stderr)
        return
    if output.stream:
        print(f"{args.prog}: {shown(output.path)} is {output.kind}, not a file: the lines go through it as they "
              f"are done, and a run cut short cannot be resumed (that needs a file)", file=sys.stderr)
    if output.done:
        print(f"{args.prog}: resuming {shown(output.path)}: {plural(output.done, 'document')} of {total} done",
              file=sys.stderr)
    progress = corpus.Progress(total, output.done)
    pool, finished = None, False
    try:
        if args.ray:
            from ..corpus_ray import RayPool
            progress.status("starting a Ray cluster" if args.ray == "local" else "joining the Ray cluster")
            pool = RayPool(args.ray, model.path, job_options, args.workers or 2, threads, n_chunks=len(remaining),
                           backend=args.backend, bf16="native" if bf16_native else "widen", verbose=args.verbose,
                           say=lambda line: progress.write(f"{args.prog}: {line}"))
        output.start()  # only now, once the run can start: a job that never started leaves nothing
        if pool is not None:
            pool.run(remaining, output, progress)
        else:
            corpus.run_in_process(job, remaining, output, progress)
        finished = True
    except corpus.StreamClosed:  # the reader of the stream went away (| head): quietly, as a shell tool
        raise SystemExit(141) from None
    finally:
        progress.close()
        if pool is not None:
            pool.close()
        output.close(discard_unused=not finished)
    seconds = progress.seconds
    verb = "scored" if task == "score" else "continued"
    rate = max(seconds, 1e-9)
    where = (f"all {total} went through {shown(output.path)}" if output.stream
             else f"{shown(output.path)} holds all {total}")
    print(f"{args.prog}: {verb} {plural(progress.docs, 'document')} ({progress.tokens:,} tokens) in {seconds:.1f} s: "
          f"{progress.docs / rate:.1f} documents/s, {progress.tokens / rate:,.0f} tokens/s; "
          f"{plural(progress.errors, 'document')} with an error field; {where}", file=sys.stderr)


COMMANDS = {
    "score-corpus": (lambda prog: corpus_parser(prog, "score"), lambda args: corpus_command(args, "score")),
    "complete-corpus": (lambda prog: corpus_parser(prog, "complete"), lambda args: corpus_command(args, "complete")),
}
