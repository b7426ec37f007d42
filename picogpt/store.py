"""Where models live: names like "124M" -> models/124M/model.dat, and loading them, fetching on request."""

import os
import sys
from pathlib import Path

from .errors import PicogptError
from .model import GPT2

MODEL_SIZES = ("124M", "355M", "774M", "1558M")  # OpenAI's released GPT-2 checkpoints
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
MODELS_DIR_ENV = "PICOGPT_MODELS_DIR"
DEMO = "demo"  # the small model trained on Python's docstrings that ships in data/demo (see its README)


def check_model_size(size):
    """Return `size` if it is one of OpenAI's GPT-2 sizes; raise PicogptError naming them if not."""
    if size not in MODEL_SIZES:
        raise PicogptError(f"unknown GPT-2 model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return size


def default_models_dir():
    """$PICOGPT_MODELS_DIR, else ./models (where tools/convert_tf_checkpoint.py puts them by default)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or "models")


def fetch_command(size, models_dir):
    return f"python tools/convert_tf_checkpoint.py --model-size {size} --models-dir {models_dir}"


def demo_model_path():
    """data/demo/model.dat: in the source checkout, or where setup.cfg's data_files install it."""
    for data in (Path(__file__).resolve().parent.parent / "data", Path(sys.prefix) / "share" / "picogpt"):
        if (data / DEMO / "model.dat").is_file():
            return data / DEMO / "model.dat"
    raise PicogptError("the demo model (data/demo/model.dat) is missing; reinstall picogpt, or re-create it "
                       "with python tools/train_demo_model.py")


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


def load(model="124M", models_dir=None, download=False, base_url=DEFAULT_BASE_URL, progress=True):
    """Load a GPT-2 model by size name or path, its weights memory-mapped.

    With download=True a missing model of a known size is downloaded from OpenAI (or `base_url`) and
    converted first; otherwise a missing model is an error that gives the command that fetches it.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    path = model_path(model, models_dir)
    if not path.exists() and model in MODEL_SIZES:
        if not download:
            raise PicogptError(f"model {model} is not in {models_dir}/; fetch it with: "
                               f"{fetch_command(model, models_dir)} (or add --download)")
        from .convert_tf import fetch_model  # TensorFlow is imported only when converting
        fetch_model(model, models_dir, base_url=base_url, progress=progress)
    return GPT2.from_file(path)
