"""GPT-2's forward pass in NumPy, in the order the paper explains it.

Radford et al., "Language Models are Unsupervised Multitask Learners" (2019), a decoder-only Transformer
(Vaswani et al., 2017) with layer norm moved to the input of each sub-block (pre-LN) and a final layer
norm. Parameter names are OpenAI's checkpoint names (wte, wpe, ln_1, attn/c_attn, mlp/c_fc, g, b), so
the mapping from model.dat to this code is the identity.

The math, top to bottom, is picoGPT's gpt2.py (jaymody/picoGPT) function for function: gelu, softmax,
layer_norm, linear, attention, mha, mlp, block, gpt2. What picogpt adds to it, and where:

- a batch axis on every activation ([n_batch, n_seq, n_embd]; one prompt is a batch of one);
- `positions` and `mask` as arguments of gpt2, built by the caller (`positions_and_mask`, at the bottom),
  so that left-padded batches and a KV cache change nothing in the math;
- a KV cache (`KVCache`, at the bottom): mha writes this call's keys and values after the ones stored;
- every matrix product through picogpt.blas.matmul, which runs the selected BLAS library;
- `last_only`: generating needs the logits of the last position only, so the others are not projected.

`GPT2`, at the bottom, holds a model's weights and runs gpt2 on token ids: it checks them, builds the
positions and the mask, and advances the cache. Hidden states and attention weights are not returned
by these functions: picogpt.trace records them from outside (picogpt.trace.collect).

Shapes: n_seq tokens in this call, n_past positions already in the cache, n_kv = n_past + n_seq keys,
n_embd model width, n_head heads of head_dim = n_embd / n_head, n_vocab tokens in the vocabulary.

Everything is float32: weights are float32, and every constant is a Python float or a float32 scalar,
which NumPy keeps at the array's precision (a float64 array or scalar would silently promote the
whole computation to float64).

A contract with picogpt.trace: the tracer wraps the functions it names in TRACED while a trace is open,
and names each step by who calls whom and in what order (block's first layer_norm is "ln_1", mha's
first linear "c_attn", ...). So the functions here must call one another through this module's global
names (never a local alias), and renaming a function, or changing which function calls which or in
what order, changes the tracer's step names: update TRACED and ROLES in picogpt/trace.py with it
(tests/test_trace.py fails until then).
"""

import math

import numpy as np

from .blas import matmul  # a @ b through the selected BLAS library (picogpt.blas.use)
from .errors import PicogptError


def gelu(x):
    """Gaussian error linear unit, GPT-2's tanh approximation of x * Phi(x)."""
    # x * x * x rather than x**3: NumPy computes a cube with pow(), twice as slow as two products.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):
    """Softmax over the last axis, exp(x) / Σ exp(x); subtracting the max keeps exp() from overflowing."""
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    """Layer norm, g · (x − mean) / √(variance + eps) + b: each row to mean 0, variance 1, scaled, shifted."""
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return g * centered / np.sqrt(variance + eps) + b


def linear(x, w, b):
    """A fully connected layer: [.., n_in] @ [n_in, n_out] + [n_out] -> [.., n_out]."""
    return matmul(x, w) + b


def attention(q, k, v, mask):
    """Scaled dot-product attention, softmax(q·kᵀ / √head_dim + mask)·v, all sequences and heads at once.

    q [n_batch, n_head, n_seq, head_dim], k and v [n_batch, n_head, n_kv, head_dim], mask (0 or -inf)
    broadcasting to [n_batch, n_head, n_seq, n_kv] -> [n_batch, n_head, n_seq, head_dim].
    """
    scores = matmul(q, k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])  # [n_batch, n_head, n_seq, n_kv]
    weights = softmax(scores + mask)  # each row sums to 1; masked keys get exactly 0
    return matmul(weights, v)


def split_heads(x, n_head):
    """[n_batch, n_seq, n_embd] -> [n_batch, n_head, n_seq, head_dim]"""
    n_batch, n_seq, n_embd = x.shape
    return x.reshape(n_batch, n_seq, n_head, n_embd // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[n_batch, n_head, n_seq, head_dim] -> [n_batch, n_seq, n_embd]"""
    n_batch, n_head, n_seq, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n_batch, n_seq, n_head * head_dim)


def mha(x, c_attn, c_proj, n_head, mask, kv_cache=None):
    """Multi-head causal self-attention, c_proj(the heads' attention side by side): [n_batch, n_seq, n_embd] -> same."""
    qkv = linear(x, **c_attn)  # [n_batch, n_seq, 3*n_embd]
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # 3 x [n_batch, n_head, n_seq, head_dim]
    if kv_cache is not None:
        # Earlier positions' keys and values were computed by earlier calls: store ours after them and
        # attend over all. k, v -> [n_batch, n_head, n_past + n_seq, head_dim]
        k, v = kv_cache.extend(k, v)
    heads = attention(q, k, v, mask)  # [n_batch, n_head, n_seq, head_dim]
    return linear(merge_heads(heads), **c_proj)


def mlp(x, c_fc, c_proj):
    """Position-wise feed-forward network: [n_batch, n_seq, n_embd] -> [.., 4*n_embd] -> [n_batch, n_seq, n_embd]."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def block(x, layer, n_head, eps, mask, kv_cache=None):
    """One transformer block, pre-LN with residual connections: [n_batch, n_seq, n_embd] -> same.

    `layer` holds this block's weights under the checkpoint's names: ln_1, attn, ln_2, mlp.
    """
    x = x + mha(layer_norm(x, **layer["ln_1"], eps=eps), **layer["attn"], n_head=n_head, mask=mask,
                kv_cache=kv_cache)
    x = x + mlp(layer_norm(x, **layer["ln_2"], eps=eps), **layer["mlp"])
    return x


def gpt2(ids, positions, mask, wte, wpe, blocks, ln_f, n_head, eps, cache=None, last_only=False):
    """GPT-2: token ids [n_batch, n_seq] at positions [n_batch, n_seq] -> logits [n_batch, n_seq, n_vocab].

    mask: 0 where a token may attend, -inf where not, [n_batch, 1, n_seq, n_kv]; cache: a KVCache whose
    stored keys and values come before these tokens. last_only: the logits of the last position only,
    [n_batch, 1, n_vocab], all that choosing the next token needs.
    """
    x = wte[ids] + wpe[positions]  # token + position embeddings: [n_batch, n_seq, n_embd]
    for i, layer in enumerate(blocks):
        x = block(x, layer, n_head=n_head, eps=eps, mask=mask, kv_cache=None if cache is None else cache.layer(i))
    if last_only:
        x = x[:, -1:]  # [n_batch, 1, n_embd]
    x = layer_norm(x, **ln_f, eps=eps)
    return matmul(x, wte.T)  # the output projection shares the token embedding: [.., n_embd] -> [.., n_vocab]


# ---------------------------------------------------------------------------------------------------
# The edges: the KV cache, positions and mask for padded batches, and a loaded model to call.

class KVCache:
    """Every layer's keys and values for the positions already run, so that each new token is computed
    without recomputing the ones before it.

    Preallocated for n_positions ([n_layer, n_batch, n_head, n_positions, head_dim] each), and sized for
    the positions a generation will use, not the whole context: each head's keys are one contiguous
    block, so spare positions would spread every step's writes over memory the OS must zero first (with
    huge pages, 2 MB for each head touched). `length` counts the positions filled, in every layer.
    """

    def __init__(self, n_layer, n_batch, n_head, n_positions, head_dim):
        self.keys = np.zeros((n_layer, n_batch, n_head, n_positions, head_dim), dtype=np.float32)
        self.values = np.zeros_like(self.keys)
        self.length = 0
        self._layers = [_LayerCache(self, i) for i in range(n_layer)]

    @property
    def n_batch(self):
        return self.keys.shape[1]

    @property
    def n_positions(self):
        """How many positions it can hold."""
        return self.keys.shape[3]

    def layer(self, i):
        """Layer i's part, which mha extends by the call's keys and values."""
        return self._layers[i]


class _LayerCache:
    """One layer's view of a KVCache: extend() writes after the cache's `length` filled positions."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def extend(self, k, v):
        """Store k, v [n_batch, n_head, n_seq, head_dim] after the filled positions; return the keys and
        values of all positions so far, [n_batch, n_head, length + n_seq, head_dim]. The cache's length
        grows once the whole forward pass is done (GPT2.forward)."""
        start = self.cache.length
        end = start + k.shape[2]
        keys, values = self.cache.keys[self.i], self.cache.values[self.i]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


def positions_and_mask(n_seq, n_past, n_pad):
    """Where n_seq new tokens are and which keys they may see, for rows that start with n_pad [n_batch]
    filler tokens (prompts of different lengths share a batch padded on the left).

    positions [n_batch, n_seq]: each token's position in its own text (padding does not count).
    mask [n_batch, 1, n_seq, n_past + n_seq], 0 or -inf: causal (the token at index t sees indices <= t),
    and no token sees a pad, except that a pad sees itself so that no row of scores is all -inf (its
    softmax would be NaN). The same for every head (axis 1 broadcasts).
    """
    n_pad = np.asarray(n_pad)
    query = n_past + np.arange(n_seq)  # [n_seq]: index of each new token in the sequence
    positions = np.maximum(query - n_pad[:, None], 0)  # [n_batch, n_seq]
    key = np.arange(n_past + n_seq)  # [n_kv]
    is_pad = key < n_pad[:, None, None]  # [n_batch, 1, n_kv]
    visible = (key <= query[:, None]) & (~is_pad | (key == query[:, None]))  # [n_batch, n_seq, n_kv]
    return positions, np.where(visible, np.float32(0), np.float32(-np.inf))[:, None]


def nest_params(tensors, n_layer):
    """Flat model.dat names -> the nested arguments of `gpt2`: "h3/attn/c_attn/w" -> blocks[3]["attn"]["c_attn"]["w"]."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in tensors.items():
        *path, leaf = name.split("/")
        node = params
        if path and path[0][0] == "h" and path[0][1:].isdigit():  # "h3" is block 3
            node, path = params["blocks"][int(path[0][1:])], path[1:]
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = array
    return params


class GPT2:
    """A GPT-2 model: hyper-parameters and weights (model.dat names -> arrays) ready to call.

        model = picogpt.load("124M")               # weights memory-mapped from MODELS_DIR/124M/model.dat
        cache = model.new_cache()
        logits = model(prompt_ids, cache=cache)  # [1, n_vocab], next-token logits after the prompt
        logits = model([next_id], cache=cache)   # one more position, reusing the cached keys/values
    """

    def __init__(self, hparams, tensors, path=None):
        self.hparams = hparams
        self.path = path  # the model.dat the weights came from, if any
        self.precision = None  # picogpt.store.load says how the weights are stored and multiplied
        raw = [name for name, t in tensors.items() if t.dtype in (np.uint16, np.int8) and type(t) is np.ndarray]
        if raw:  # bfloat16 bit patterns or int8 values without their scales would be multiplied as integers
            raise TypeError(f"tensor {raw[0]} holds bfloat16 bit patterns or int8 values; load the model with "
                            f"picogpt.load, or see picogpt.precision.weights_for_backend")
        self.params = nest_params(tensors, hparams["n_layer"])
        self.n_params = sum(t.size for t in tensors.values())

    def new_cache(self, n_batch=1, n_positions=None):
        """An empty KVCache for n_batch sequences of up to n_positions (default and at most n_ctx)."""
        h = self.hparams
        n_positions = h["n_ctx"] if n_positions is None else min(n_positions, h["n_ctx"])
        return KVCache(h["n_layer"], n_batch, h["n_head"], n_positions, h["n_embd"] // h["n_head"])

    def forward(self, ids, cache=None, n_pad=None, all_logits=False, positions=None):
        """Next-token logits for token ids [n_seq] or a batch [n_batch, n_seq] that follow the cache's
        positions: [n_seq, n_vocab] or [n_batch, n_seq, n_vocab] with all_logits, else those of the
        last position only, [1, n_vocab] or [n_batch, 1, n_vocab] (the batch axis only if ids had one).

        n_pad [n_batch]: how many filler tokens each row starts with (left padding).
        positions [n_batch, n_seq]: the tokens' positions, if not their place after the padding (Hugging
        Face's forward counts the padding unless given position_ids; picogpt.hf follows it).
        """
        ids = self.check_ids(ids, cache)
        batch = ids if ids.ndim == 2 else ids[None]
        n_past = cache.length if cache is not None else 0
        own_positions, mask = positions_and_mask(batch.shape[1], n_past,
                                                 np.zeros(len(batch), np.int64) if n_pad is None else n_pad)
        positions = own_positions if positions is None else np.broadcast_to(positions, own_positions.shape)
        logits = gpt2(batch, positions, mask, **self.params, n_head=self.hparams["n_head"],
                      eps=self.hparams["layer_norm_epsilon"], cache=cache, last_only=not all_logits)
        if cache is not None:
            cache.length += batch.shape[1]  # every layer has stored this call's keys and values
        return logits if ids.ndim == 2 else logits[0]

    __call__ = forward

    def check_ids(self, ids, cache=None):
        """ids as an integer array [n_seq] or [n_batch, n_seq], checked against the vocabulary, the
        context and the cache; raises PicogptError (a user's mistake) or ValueError (a caller's)."""
        h = self.hparams
        ids = np.asarray(ids)
        if ids.ndim not in (1, 2) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("ids must be a non-empty sequence of integer token ids, [n_seq] or [n_batch, n_seq]")
        if ids.min() < 0 or ids.max() >= h["n_vocab"]:
            raise PicogptError(f"token id {int(ids.max() if ids.max() >= h['n_vocab'] else ids.min())} is "
                               f"outside this model's vocabulary of {h['n_vocab']}")
        n_past = cache.length if cache is not None else 0
        if n_past + ids.shape[-1] > h["n_ctx"]:
            raise PicogptError(f"{n_past + ids.shape[-1]} positions exceed the model's context of {h['n_ctx']} "
                               f"tokens; use a shorter prompt or fewer new tokens")
        if cache is not None and n_past + ids.shape[-1] > cache.n_positions:
            raise ValueError(f"{n_past + ids.shape[-1]} positions exceed the {cache.n_positions} this cache "
                             f"was made for (model.new_cache(n_positions=...))")
        if cache is not None and cache.n_batch != (len(ids) if ids.ndim == 2 else 1):
            raise ValueError(f"the cache holds {cache.n_batch} sequences, ids {len(ids) if ids.ndim == 2 else 1}")
        return ids
