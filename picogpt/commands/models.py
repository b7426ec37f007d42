"""Model files: picogpt verify MODEL, convert-tf (OpenAI's TensorFlow checkpoints), convert-hf (Hugging Face
folders) and convert-dtype (float32, bfloat16 and int8 weights)."""

import sys
import time
from pathlib import Path

from .. import store
from ..convert_hf import convert_hf_checkpoint
from ..convert_tf import convert_checkpoint, require_tensorflow
from ..download import DEFAULT_BASE_URL, MODEL_SIZES
from ..errors import PicogptError
from ..modelfile import SCALE, WEIGHT_DTYPES, convert_dtype, open_model_file
from ..outputs import output_file, remove_stale_partials
from .arguments import ArgumentParser


# ---------------------------------------------------------------------------------------------------
# picogpt verify MODEL

def verify_parser(prog):
    p = ArgumentParser(prog=prog,
                       description="Check a model.dat: structure, SHA-256 checksum, and no NaN or infinite weights; "
                       "remove the temporary files that killed conversions left beside it.")
    p.add_argument("model", help="a size name (looked up under --models-dir) or a path to a model.dat")
    p.add_argument("--models-dir", default=None, help="where model sizes are looked up")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def verify_command(args):
    for stale in remove_stale_partials(store.model_path(args.model, args.models_dir)):
        print(f"{args.prog}: removed {stale}, left by a conversion that was killed", file=sys.stderr)
    model_file = store.model_file(args.model, args.models_dir)
    model_file.verify()
    n_params = sum(t.size for name, t in model_file.tensors.items() if not name.endswith(SCALE))
    n_tensors = sum(not name.endswith(SCALE) for name in model_file.tensors)
    print(f"{model_file.path}: OK ({n_tensors} tensors, {n_params / 1e6:.1f}M parameters, "
          f"{model_file.weight_dtype} weights, sha256 {model_file.sha256.hex()})")
    if model_file.quantization_errors:
        print(f"{model_file.path}: {model_file.quantization_summary()}")


# ---------------------------------------------------------------------------------------------------
# picogpt convert-tf --model-size 124M   (tools/convert_tf_checkpoint.py)

def convert_tf_parser(prog):
    p = ArgumentParser(prog=prog, description="Download OpenAI's TensorFlow GPT-2 checkpoint and convert it "
                       "to picogpt's model.dat (or convert one already on disk with --checkpoint-dir).")
    p.add_argument("--model-size", default="124M", help=f"one of {', '.join(MODEL_SIZES)} (default: 124M)")
    p.add_argument("--models-dir", default=None,
                   help="checkpoints go to MODELS_DIR/SIZE/, model.dat beside them (default: $PICOGPT_MODELS_DIR, "
                        "else the per-user models folder; created if missing)")
    p.add_argument("--base-url", default=None, help=f"where to download from (default: $PICOGPT_BASE_URL, else "
                   f"{DEFAULT_BASE_URL})")
    p.add_argument("--checkpoint-dir", default=None,
                   help="convert the checkpoint already in this folder, with no network at all")
    p.add_argument("--out", default=None, help="where to write model.dat (default: next to the checkpoint)")
    add_dtype_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_tf_command(args):
    started = time.perf_counter()
    if args.checkpoint_dir is None:  # fetch: download (resuming) + convert
        out = args.out and output_file(args.out, "model.dat", create_folder=True, regular=True)
        out = store.fetch(args.model_size, args.models_dir, base_url=args.base_url, progress=not args.no_progress,
                          out=out, weight_dtype=args.dtype)
        hparams = open_model_file(out).hparams
    else:
        require_tensorflow()
        checkpoint_dir = Path(args.checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise PicogptError(f"checkpoint folder {checkpoint_dir} does not exist")
        out = output_file(args.out if args.out is not None else checkpoint_dir / "model.dat", "model.dat",
                          create_folder=True, regular=True)
        hparams = convert_checkpoint(checkpoint_dir, out, args.dtype)
    report_written(out, hparams, time.perf_counter() - started)


def add_dtype_argument(p):
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="f32",
                   help="how to store the weight matrices: f32 (default); bf16, bfloat16 rounded to nearest even "
                        "(half the file; multiplied natively on CPUs with bfloat16 instructions, widened to float32 "
                        "at load elsewhere); or int8, one scale per output unit (a quarter of the file; multiplied "
                        "as int8 by --backend onednn, widened at load by the others)")


# ---------------------------------------------------------------------------------------------------
# picogpt convert-dtype MODEL --to bf16

def convert_dtype_parser(prog):
    p = ArgumentParser(prog=prog, description="Rewrite a model.dat with its weight matrices in another type: "
                       "bf16 (bfloat16, rounded to nearest even: half the bytes), int8 (one float32 scale per "
                       "output unit: a quarter of the bytes; the error is reported) or f32 (exact from bf16; "
                       "scale times value from int8).")
    p.add_argument("model", help="a size name (looked up under --models-dir), demo, or a path to a model.dat")
    p.add_argument("--to", required=True, choices=WEIGHT_DTYPES, help="the weight type to write: f32, bf16 or int8")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write (default: model-bf16.dat, model-int8.dat or model-f32.dat beside the input)")
    p.add_argument("--models-dir", default=None, help="where model sizes are looked up")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_dtype_command(args):
    source = store.model_path(args.model, args.models_dir)
    out = Path(args.out) if args.out is not None else source.with_name(f"model-{args.to}.dat")
    out = output_file(out, f"model-{args.to}.dat", create_folder=True, regular=True)
    started = time.perf_counter()
    hparams = convert_dtype(source, out, args.to)
    report_written(out, hparams, time.perf_counter() - started)


def report_written(out, hparams, seconds):
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: n_layer {hparams['n_layer']}, n_embd "
          f"{hparams['n_embd']}, n_head {hparams['n_head']}, n_ctx {hparams['n_ctx']}, n_vocab "
          f"{hparams['n_vocab']}) in {seconds:.1f} s", file=sys.stderr)
    summary = open_model_file(out).quantization_summary()
    if summary:  # int8: how far the weights moved
        print(f"{out}: {summary}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt convert-hf DIR   (tools/convert_hf_checkpoint.py)

def convert_hf_parser(prog):
    p = ArgumentParser(prog=prog, description="Convert a Hugging Face GPT-2 model folder "
                       "(config.json and model.safetensors, or shards with model.safetensors.index.json) to "
                       "picogpt's model.dat. Needs safetensors only: no PyTorch, no TensorFlow.")
    p.add_argument("folder", metavar="DIR", help="the model folder, e.g. one filled by "
                   "`hf download openai-community/gpt2 config.json model.safetensors --local-dir DIR`")
    p.add_argument("--out", default=None, help="where to write model.dat (default: DIR/model.dat)")
    add_dtype_argument(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_hf_command(args):
    out = Path(args.out) if args.out is not None else Path(args.folder) / "model.dat"
    if args.out is not None or Path(args.folder).is_dir():  # (a missing folder is convert_hf's to explain)
        out = output_file(out, "model.dat", create_folder=True, regular=True)
    t = time.perf_counter()
    hparams = convert_hf_checkpoint(args.folder, out, args.dtype)
    report_written(out, hparams, time.perf_counter() - t)


COMMANDS = {
    "verify": (verify_parser, verify_command),
    "convert-tf": (convert_tf_parser, convert_tf_command),
    "convert-hf": (convert_hf_parser, convert_hf_command),
    "convert-dtype": (convert_dtype_parser, convert_dtype_command),
}
