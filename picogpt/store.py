"""Where models live: names like "124M" -> models/124M/model.dat, loading them, and fetching them.

    model = picogpt.load("124M")                 # models/124M/model.dat, weights memory-mapped
    model = picogpt.load("124M", download=True)  # fetched from OpenAI and converted first if missing
    path = fetch("124M", "models")               # download + convert, what `picogpt convert-tf` does
"""

import os
from pathlib import Path

from . import files
from .convert_tf import convert_checkpoint, require_tensorflow
from .download import DEFAULT_BASE_URL, MODEL_SIZES, check_model_size, download_checkpoint
from .errors import PicogptError
from .model import GPT2
from .modelfile import open_model_file

MODELS_DIR_ENV = "PICOGPT_MODELS_DIR"
DEMO = "demo"  # the small model trained on Python's docstrings that ships in data/demo (see its README)


def default_models_dir():
    """$PICOGPT_MODELS_DIR, else ./models (where tools/convert_tf_checkpoint.py puts them by default)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or "models")


def fetch_command(size, models_dir):
    return f"python tools/convert_tf_checkpoint.py --model-size {size} --models-dir {models_dir}"


def demo_model_path():
    """data/demo/model.dat: in the source checkout, or where setup.cfg's data_files install it."""
    path = files.find_file(f"{DEMO}/model.dat", files.data_dirs())
    if path is None:
        raise PicogptError("the demo model (data/demo/model.dat) is missing; reinstall picogpt, or re-create it "
                           "with python tools/train_demo_model.py")
    return path


def default_model(models_dir=None):
    """GPT-2 124M if it has been fetched, else the demo model; and a notice to show when it is the demo."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if (models_dir / "124M" / "model.dat").exists():
        return "124M", None
    return DEMO, (f"GPT-2 124M is not in {models_dir}/, so this is the small demo model trained on Python's "
                  f"docstrings; fetch 124M with: {fetch_command('124M', models_dir)}")


def model_path(model, models_dir=None):
    """The model.dat for a size name ("124M"), "demo", a model.dat path, or a folder holding a model.dat."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if model == DEMO:
        return demo_model_path()
    if model in MODEL_SIZES:
        return models_dir / model / "model.dat"
    path = Path(model)
    if path.is_dir():
        return path / "model.dat"
    if path.exists() or path.suffix == ".dat" or len(path.parts) > 1:
        return path
    raise PicogptError(f"unknown model {model!r}: use one of {', '.join(MODEL_SIZES)}, {DEMO} or a path to a model.dat")


def fetch(size, models_dir=None, base_url=DEFAULT_BASE_URL, progress=True, out=None):
    """Download OpenAI's checkpoint of `size` into models_dir/size/ (skipping complete files, resuming
    partial ones), convert it to `out` (default models_dir/size/model.dat), and return that path. The
    layout is OpenAI's download script's, so a folder it filled is converted without downloading anything."""
    size = check_model_size(size)
    require_tensorflow()  # before a download of hundreds of megabytes that could not be converted
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    checkpoint_dir = download_checkpoint(size, models_dir / size, base_url, progress=progress)
    out = Path(out) if out is not None else checkpoint_dir / "model.dat"
    convert_checkpoint(checkpoint_dir, out)
    return out


def load(model="124M", models_dir=None, download=False, base_url=DEFAULT_BASE_URL, progress=True):
    """Load a GPT-2 model by size name or path, its weights memory-mapped.

    With download=True a missing model of a known size is fetched (downloaded from OpenAI or `base_url`
    and converted) first; otherwise a missing model is an error that gives the command that fetches it.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    path = model_path(model, models_dir)
    if not path.exists() and model in MODEL_SIZES:
        if not download:
            raise PicogptError(f"model {model} is not in {models_dir}/; fetch it with: "
                               f"{fetch_command(model, models_dir)} (or add --download)")
        fetch(model, models_dir, base_url=base_url, progress=progress)
    model_file = open_model_file(path)
    return GPT2(model_file.hparams, model_file.tensors, path=model_file.path)
