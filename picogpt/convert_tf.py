"""OpenAI's TensorFlow GPT-2 checkpoints -> model.dat. The only module of picogpt that imports TensorFlow.

It converts a checkpoint folder already on disk; downloading one is picogpt.download's job, and
picogpt.store.fetch does both.

OpenAI released GPT-2 as TensorFlow 1 checkpoints (models/{124M,355M,774M,1558M}/: checkpoint,
hparams.json, model.ckpt.{data-00000-of-00001,index,meta}, plus the vocabulary). Variables are named
`model/wte`, `model/h0/attn/c_attn/w`, ... and the linear weights are conv1d kernels [1, n_in, n_out].
Conversion drops the "model/" prefix and the leading 1 and writes each tensor straight into model.dat,
one at a time, so even 1558M is never held in memory twice.
"""

import importlib.util
import json
import os
from pathlib import Path

from .errors import PicogptError, first_line, plural
from .hints import install_command
from .modelfile import ModelFileWriter
from .tensors import TF_PREFIX as PREFIX
from .tensors import check_hparams, gpt2_tensor_specs, tf_shape


def require_tensorflow():
    """Fail at once, without importing it (4 s), if TensorFlow is not installed."""
    if importlib.util.find_spec("tensorflow") is None:
        raise PicogptError(f"reading TensorFlow checkpoints needs TensorFlow, which is not installed: "
                           f"{install_command('convert')}")


def _import_tensorflow():
    require_tensorflow()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
    import tensorflow as tf
    return tf


def read_hparams(checkpoint_dir):
    path = Path(checkpoint_dir) / "hparams.json"
    try:
        hparams = json.loads(path.read_text())
    except FileNotFoundError:
        raise PicogptError(f"{path} is missing; is {checkpoint_dir} an OpenAI GPT-2 checkpoint folder?") from None
    except (OSError, ValueError) as e:
        raise PicogptError(f"cannot read {path}: {e}; download the checkpoint again") from None
    return check_hparams(hparams, str(path), "download the checkpoint again")


def convert_checkpoint(checkpoint_dir, out_path, weight_dtype="f32"):
    """Convert the TF checkpoint in `checkpoint_dir` to model.dat at `out_path`; return its hparams."""
    checkpoint_dir = Path(checkpoint_dir)
    hparams = read_hparams(checkpoint_dir)
    tf = _import_tensorflow()
    prefix = tf.train.latest_checkpoint(str(checkpoint_dir)) or str(checkpoint_dir / "model.ckpt")
    try:
        reader = tf.train.load_checkpoint(prefix)
        stored_shapes = reader.get_variable_to_shape_map()
    except Exception as e:  # TF raises NotFoundError, DataLossError, ... with multi-line messages
        raise PicogptError(f"cannot read the TensorFlow checkpoint {prefix}: {first_line(e)}; "
                           f"download it again") from None

    specs = gpt2_tensor_specs(hparams)
    unexpected = sorted(set(stored_shapes) - {PREFIX + name for name in specs})
    if unexpected:
        raise PicogptError(f"the checkpoint has variable {unexpected[0]} that its hparams.json "
                           f"({plural(hparams['n_layer'], 'layer')}) does not account for; the two files do not "
                           f"belong together")
    with ModelFileWriter(out_path, hparams, weight_dtype) as out:
        for name, (shape, _) in specs.items():
            stored = stored_shapes.get(PREFIX + name)
            if stored is None or tuple(stored) != tf_shape(name, shape):
                raise PicogptError(f"checkpoint variable {PREFIX}{name} is {stored}, expected "
                                   f"{list(tf_shape(name, shape))} for hparams.json; "
                                   f"the checkpoint is incomplete or does not match its hparams.json")
            try:
                array = reader.get_tensor(PREFIX + name)
            except Exception as e:
                raise PicogptError(f"cannot read {PREFIX}{name} from {prefix}: {type(e).__name__}; "
                                   f"the checkpoint is damaged, download it again") from None
            out.write(name, array.reshape(shape))  # linear weights: conv1d kernels [1, n_in, n_out]
    return hparams
