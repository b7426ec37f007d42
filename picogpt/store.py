"""Where models live: names like "124M" -> MODELS_DIR/124M/model.dat, loading them, and fetching them.

    model = picogpt.load("124M")                 # MODELS_DIR/124M/model.dat, weights memory-mapped
    model = picogpt.load("124M", download=True)  # fetched from OpenAI and converted first if missing
    path = fetch("124M")                         # download + convert, what `picogpt convert-tf` does

MODELS_DIR is one folder per user, whatever the current folder: $PICOGPT_MODELS_DIR, else the user's
data folder (~/.local/share/picogpt/models on Linux, ~/Library/Application Support/picogpt/models on
macOS), so a model is found where it was fetched. A folder the user names (--models-dir, or the
variable) must exist when models are looked up in it: a typo is an error, not the demo model.
"""

import os
import sys
from pathlib import Path

from . import hints, precision
from .download import MODEL_SIZES, check_model_size, download_checkpoint
from .errors import PicogptError
from .model import GPT2
from .modelfile import open_model_file
from .outputs import remove_stale_partials
from .precision import weights_for_backend
from .shipped import DEMO, demo_model_path, demo_remake_hint

MODELS_DIR_ENV = "PICOGPT_MODELS_DIR"


class NotFetched(PicogptError):
    """A model of a known size that has not been fetched (downloaded and converted) yet."""


def default_models_dir():
    """$PICOGPT_MODELS_DIR, else the per-user data folder's models/ (platformdirs knows it per system)."""
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV])
    import platformdirs  # 15 ms, for a default only
    return platformdirs.user_data_path("picogpt", appauthor=False) / "models"


def models_dir(named=None):
    """The folder sizes are looked up in: `named` (a --models-dir) or the default. A folder the user
    named (the argument or $PICOGPT_MODELS_DIR) that does not exist is an error."""
    if named is not None:
        path, source = Path(named), "given by --models-dir"
    elif os.environ.get(MODELS_DIR_ENV):
        path, source = Path(os.environ[MODELS_DIR_ENV]), f"named by ${MODELS_DIR_ENV}"
    else:
        return default_models_dir()  # may not exist yet: no model has been fetched
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise PicogptError(f"the models folder {path} ({source}) {problem}; check the name, or fetch a model "
                           f"into it with: {hints.fetch_command('124M', named)}")
    return path


def default_model(named_models_dir=None):
    """GPT-2 124M if it has been fetched, else the demo model; and a notice to show when it is the demo."""
    where = models_dir(named_models_dir)
    if (where / "124M" / "model.dat").exists():
        return "124M", None
    notice = (f"GPT-2 124M is not in {where}/, so this is the small demo model trained on Python's documentation; "
              f"fetch 124M with: {hints.fetch_command('124M', named_models_dir)}")
    old = Path("models") / "124M" / "model.dat"  # where picogpt 0.1 fetched to, relative to the current folder
    if named_models_dir is None and old.is_file() and old.resolve() != (where / "124M" / "model.dat").resolve():
        notice += f" (or use the copy in ./models with --models-dir models, or move ./models/124M to {where}/)"
    return DEMO, notice


def model_path(model, named_models_dir=None):
    """The model.dat for a size name ("124M"), "demo", a model.dat path, or a folder holding a model.dat."""
    if model == DEMO:
        return demo_model_path()
    if model in MODEL_SIZES:
        return models_dir(named_models_dir) / model / "model.dat"
    path = Path(model)
    if path.is_dir():
        return path / "model.dat"
    if path.exists() or path.suffix == ".dat" or len(path.parts) > 1:
        return path
    raise PicogptError(f"unknown model {model!r}: use one of {', '.join(MODEL_SIZES)}, {DEMO} or a path to a model.dat")


def fetch(size, models_dir=None, base_url=None, progress=True, out=None, weight_dtype="f32"):
    """Download OpenAI's checkpoint of `size` into models_dir/size/ (default: the per-user models folder;
    created if missing), skipping complete files and resuming partial ones, convert it to `out` (default
    models_dir/size/model.dat), and return that path. The layout is OpenAI's download script's, so a
    folder it filled is converted without downloading anything. weight_dtype "bf16" stores the weight
    matrices in bfloat16 (half the file; see picogpt.bfloat16)."""
    from .convert_tf import convert_checkpoint, require_tensorflow  # the converter, only when a fetch runs
    size = check_model_size(size)
    require_tensorflow()  # before a download of hundreds of megabytes that could not be converted
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    checkpoint_dir = download_checkpoint(size, models_dir / size, base_url, progress=progress)
    out = Path(out) if out is not None else checkpoint_dir / "model.dat"
    convert_checkpoint(checkpoint_dir, out, weight_dtype)
    return out


def model_file(model, named_models_dir=None):
    """Open (map and check) the model file a name or path stands for, with the hint its damage calls for."""
    path = model_path(model, named_models_dir)
    remove_stale_partials(path)  # what killed conversions of this file left beside it
    if model in MODEL_SIZES and not path.exists():
        raise NotFetched(f"model {model} is not in {path.parent.parent}/; fetch it with: "
                         f"{hints.fetch_command(model, named_models_dir)}")
    if model == DEMO:
        hint = demo_remake_hint()
    elif model in MODEL_SIZES:
        hint = f"fetch it again with: {hints.fetch_command(model, named_models_dir)}"
    else:
        hint = None
    return open_model_file(path, remake_hint=hint)


def load(model="124M", models_dir=None, download=False, base_url=None, progress=True, bf16=None, quiet=False):
    """Load a GPT-2 model by size name or path, its weights memory-mapped.

    With download=True a missing model of a known size is fetched (downloaded from `base_url`, else
    $PICOGPT_BASE_URL, else OpenAI, and converted) first; otherwise a missing model is an error that gives
    the command that fetches it.
    models_dir: where sizes are looked up (default: $PICOGPT_MODELS_DIR or the per-user models folder).
    A bfloat16 file is multiplied natively or widened to float32 (see weights_for_backend; bf16="widen"
    or "native" decides instead); widening is said in one line on stderr unless quiet.
    """
    if model in MODEL_SIZES and download:
        where = Path(models_dir) if models_dir is not None else default_models_dir()
        if not (where / model / "model.dat").exists():
            fetch(model, where, base_url=base_url, progress=progress)
    opened = model_file(model, models_dir)  # NotFetched, with the command that fetches it, if missing
    tensors, precision = weights_for_backend(opened, bf16)
    loaded = GPT2(opened.hparams, tensors, path=opened.path)
    loaded.precision = precision
    if widening_worth_saying(loaded) and not quiet:
        print(f"picogpt: {precision.note}", file=sys.stderr)
    return loaded


def widening_worth_saying(loaded):
    """Whether a model's bfloat16 weights were widened to float32 at load and that is news: a fetched or
    converted model's memory doubles, or native was asked for ($PICOGPT_BF16=native) and could not be. The
    shipped demo model's float32 copy is some 50 MB, not worth a line on every `make run` (-v says it)."""
    if not loaded.precision.widened:
        return False
    if precision.asked_for() == "native":
        return True
    try:
        return Path(loaded.path).resolve() != demo_model_path().resolve()
    except PicogptError:  # no demo model anywhere: this one is not it
        return True


