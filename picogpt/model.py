"""GPT-2's forward pass in NumPy, in the order the paper explains it.

Radford et al., "Language Models are Unsupervised Multitask Learners" (2019), a decoder-only Transformer
(Vaswani et al., 2017) with layer norm moved to the input of each sub-block (pre-LN) and a final layer
norm. Parameter names are OpenAI's checkpoint names (wte, wpe, ln_1, attn/c_attn, mlp/c_fc, g, b), so
the mapping from model.dat to this code is the identity.

Shapes: n_seq tokens in this call, n_past positions already in the cache, n_embd model width, n_head
heads of head_dim = n_embd / n_head, n_vocab tokens in the vocabulary.

Everything is float32: weights are float32, and every constant is a Python float or a float32 scalar,
which NumPy keeps at the array's precision (a float64 array or scalar would silently promote the
whole computation to float64).
"""

import math
from typing import NamedTuple

import numpy as np

from .blas import matmul  # a @ b through the selected BLAS library (picogpt.blas.use)
from .errors import PicogptError
from .modelfile import open_model_file


def gelu(x):
    """Gaussian error linear unit, GPT-2's tanh approximation of x * Phi(x)."""
    # x * x * x rather than x**3: NumPy computes a cube with pow(), twice as slow as two products.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):
    """Softmax over the last axis; subtracting the max keeps exp() from overflowing."""
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    """Normalise each row to mean 0 and variance 1, then scale by g and shift by b."""
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return g * centered / np.sqrt(variance + eps) + b


def linear(x, w, b):
    """A fully connected layer: [n, n_in] @ [n_in, n_out] + [n_out] -> [n, n_out]."""
    return matmul(x, w) + b


def attention_mask(n_seq, n_past, n_pad):
    """Which keys each query may see, as an additive mask [n_batch, 1, n_seq, n_past + n_seq]: 0 or -inf.

    Causal: the token at index t sees indices <= t. A batch of prompts of different lengths is padded
    on the left (row b starts with n_pad[b] filler tokens): no token sees a pad, except that a pad sees
    itself, so that no row of scores is all -inf (its softmax would be NaN). The mask is the same for
    every head (axis 1 broadcasts).
    """
    query = n_past + np.arange(n_seq)[:, None]  # [n_seq, 1]: index of each query in the sequence
    key = np.arange(n_past + n_seq)  # [n_kv]
    is_pad = key < np.asarray(n_pad)[:, None, None]  # [n_batch, 1, n_kv]
    visible = (key <= query) & (~is_pad | (key == query))  # [n_batch, n_seq, n_kv]
    return np.where(visible, np.float32(0), np.float32(-np.inf))[:, None]


def attention(q, k, v, mask):
    """Scaled dot-product attention, all sequences and heads at once: (output, weights).

    q [n_batch, n_head, n_seq, head_dim], k and v [n_batch, n_head, n_kv, head_dim], mask broadcasting
    to [n_batch, n_head, n_seq, n_kv] -> output [n_batch, n_head, n_seq, head_dim] and the attention
    weights [n_batch, n_head, n_seq, n_kv] (each row sums to 1; returned so they can be inspected).
    With a cache n_kv = n_past + n_seq, without one n_kv = n_seq.
    """
    scores = matmul(q, k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])  # [n_batch, n_head, n_seq, n_kv]
    weights = softmax(scores + mask)
    return matmul(weights, v), weights


def split_heads(x, n_head):
    """[n_batch, n_seq, n_embd] -> [n_batch, n_head, n_seq, head_dim]"""
    n_batch, n_seq, n_embd = x.shape
    return x.reshape(n_batch, n_seq, n_head, n_embd // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[n_batch, n_head, n_seq, head_dim] -> [n_batch, n_seq, n_embd]"""
    n_batch, n_head, n_seq, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n_batch, n_seq, n_head * head_dim)


def mha(x, c_attn, c_proj, n_head, mask, cache=None):
    """Multi-head causal self-attention: [n_batch, n_seq, n_embd] -> ([n_batch, n_seq, n_embd], weights)."""
    qkv = linear(x, **c_attn)  # [n_batch, n_seq, 3*n_embd]
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # 3 x [n_batch, n_head, n_seq, head_dim]
    if cache is not None:
        # The keys and values of earlier positions were computed by earlier calls: store ours beside
        # them and attend over all of them. k, v -> [n_batch, n_head, n_past + n_seq, head_dim]
        k, v = cache.extend(k, v)
    heads, weights = attention(q, k, v, mask)  # [n_batch, n_head, n_seq, head_dim]
    return linear(merge_heads(heads), **c_proj), weights


def mlp(x, c_fc, c_proj):
    """Position-wise feed-forward network: [n_batch, n_seq, n_embd] -> [.., 4*n_embd] -> [n_batch, n_seq, n_embd]."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def block(x, layer, n_head, eps, mask, cache=None):
    """One transformer block, pre-LN with residual connections: [n_batch, n_seq, n_embd] -> same, and
    the block's attention weights [n_batch, n_head, n_seq, n_kv].

    `layer` holds this block's weights under the checkpoint's names: ln_1, attn, ln_2, mlp.
    """
    attn_out, attn_weights = mha(layer_norm(x, **layer["ln_1"], eps=eps), **layer["attn"], n_head=n_head,
                                 mask=mask, cache=cache)
    x = x + attn_out
    x = x + mlp(layer_norm(x, **layer["ln_2"], eps=eps), **layer["mlp"])
    return x, attn_weights


class Output(NamedTuple):
    """What `gpt2` returns. Lists are empty unless asked for."""

    logits: np.ndarray  # [n_batch, n_seq, n_vocab], or [n_batch, 1, n_vocab] for the last position only
    hidden_states: list  # n_layer + 1 x [n_batch, n_seq, n_embd]: each block's input, then ln_f's output
    attentions: list  # n_layer x [n_batch, n_head, n_seq, n_kv]: each block's attention weights


def gpt2(ids, wte, wpe, blocks, ln_f, n_head, eps, n_pad=None, cache=None, all_logits=False,
         output_hidden_states=False, output_attentions=False):
    """GPT-2: token ids [n_batch, n_seq] -> next-token logits [n_batch, n_seq, n_vocab] (an Output).

    Only the last position's logits are computed unless all_logits: generating needs no others. With a
    cache, `ids` are the tokens after the n_past already in it (the whole prompt on the first call,
    "prefill"; then one new token per call, "decode"), and the cache grows by n_seq. n_pad [n_batch]
    counts the filler tokens each row starts with when prompts of different lengths share a batch.
    """
    n_batch, n_seq = ids.shape
    n_past = cache[0].length if cache is not None else 0
    n_pad = np.zeros(n_batch, dtype=np.int64) if n_pad is None else np.asarray(n_pad)
    # Position of each token in its own text: padding does not count. [n_batch, n_seq]
    positions = np.maximum(n_past + np.arange(n_seq) - n_pad[:, None], 0)
    x = wte[ids] + wpe[positions]  # token + position embeddings: [n_batch, n_seq, n_embd]
    mask = attention_mask(n_seq, n_past, n_pad)  # [n_batch, 1, n_seq, n_past + n_seq]
    hidden_states, attentions = [], []
    for i, layer in enumerate(blocks):
        if output_hidden_states:
            hidden_states.append(x)
        x, attn_weights = block(x, layer, n_head=n_head, eps=eps, mask=mask,
                                cache=None if cache is None else cache[i])
        if output_attentions:
            attentions.append(attn_weights)
    if not (all_logits or output_hidden_states):
        x = x[:, -1:]  # the next token after the last position is all that generating needs
    x = layer_norm(x, **ln_f, eps=eps)
    if output_hidden_states:
        hidden_states.append(x)
    if not all_logits:
        x = x[:, -1:]
    logits = matmul(x, wte.T)  # the output projection shares the token embedding: [.., n_embd] -> [.., n_vocab]
    return Output(logits, hidden_states, attentions)


class LayerCache:
    """One layer's keys and values for the positions seen so far, preallocated for n_positions of them."""

    def __init__(self, n_batch, n_head, n_positions, head_dim):
        # Sized for the positions that will be used, not the whole context: each head's keys are one
        # contiguous [n_positions, head_dim] block, so spare positions would spread the writes of every
        # step over memory the OS must zero first (with huge pages, 2 MB for each head touched).
        self.keys = np.zeros((n_batch, n_head, n_positions, head_dim), dtype=np.float32)
        self.values = np.zeros((n_batch, n_head, n_positions, head_dim), dtype=np.float32)
        self.length = 0  # positions filled

    def extend(self, k, v):
        """Write k, v [n_batch, n_head, n_seq, head_dim] after the stored ones; return all so far
        [n_batch, n_head, length, head_dim]."""
        start, self.length = self.length, self.length + k.shape[2]
        self.keys[:, :, start:self.length] = k
        self.values[:, :, start:self.length] = v
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


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
    """A GPT-2 model: hyper-parameters and weights (memory-mapped from model.dat) ready to call.

        model = GPT2.from_file("models/124M/model.dat")
        cache = model.new_cache()
        logits = model(prompt_ids, cache=cache)  # [1, n_vocab], next-token logits after the prompt
        logits = model([next_id], cache=cache)   # one more position, reusing the cached keys/values
    """

    def __init__(self, hparams, tensors, path=None):
        self.hparams = hparams
        self.path = path
        self.params = nest_params(tensors, hparams["n_layer"])
        self.n_params = sum(t.size for t in tensors.values())

    @classmethod
    def from_file(cls, path):
        model_file = open_model_file(path)
        return cls(model_file.hparams, model_file.tensors, path=model_file.path)

    def new_cache(self, n_batch=1, n_positions=None):
        """An empty KV cache for n_batch sequences of up to n_positions (default n_ctx): a LayerCache per layer."""
        h = self.hparams
        n_positions = h["n_ctx"] if n_positions is None else min(n_positions, h["n_ctx"])
        head_dim = h["n_embd"] // h["n_head"]
        return [LayerCache(n_batch, h["n_head"], n_positions, head_dim) for _ in range(h["n_layer"])]

    def forward(self, ids, cache=None, n_pad=None, all_logits=False, output_hidden_states=False,
                output_attentions=False):
        """Run token ids [n_seq] or a batch [n_batch, n_seq] (after the cache's positions): an Output.

        Its arrays have the batch axis only if `ids` had one: logits [n_seq or 1, n_vocab] for one
        sequence, [n_batch, n_seq or 1, n_vocab] for a batch, and so on. n_pad: see `gpt2`.
        """
        h = self.hparams
        ids = np.asarray(ids)
        single = ids.ndim == 1
        if ids.ndim not in (1, 2) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("ids must be a non-empty sequence of integer token ids, [n_seq] or [n_batch, n_seq]")
        if ids.min() < 0 or ids.max() >= h["n_vocab"]:
            raise PicogptError(f"token id {int(ids.max() if ids.max() >= h['n_vocab'] else ids.min())} is "
                               f"outside this model's vocabulary of {h['n_vocab']}")
        n_past = cache[0].length if cache is not None else 0
        if n_past + ids.shape[-1] > h["n_ctx"]:
            raise PicogptError(f"{n_past + ids.shape[-1]} positions exceed the model's context of {h['n_ctx']} "
                               f"tokens; use a shorter prompt or fewer new tokens")
        if cache is not None and n_past + ids.shape[-1] > cache[0].keys.shape[2]:
            raise ValueError(f"{n_past + ids.shape[-1]} positions exceed the {cache[0].keys.shape[2]} this cache "
                             f"was made for (model.new_cache(n_positions=...))")
        batch = ids[None] if single else ids
        if cache is not None and cache[0].keys.shape[0] != len(batch):
            raise ValueError(f"the cache holds {cache[0].keys.shape[0]} sequences, ids {len(batch)}")
        out = gpt2(batch, **self.params, n_head=h["n_head"], eps=h["layer_norm_epsilon"], n_pad=n_pad,
                   cache=cache, all_logits=all_logits, output_hidden_states=output_hidden_states,
                   output_attentions=output_attentions)
        if single:  # drop the batch axis the caller did not give
            out = Output(out.logits[0], [x[0] for x in out.hidden_states], [a[0] for a in out.attentions])
        return out

    def __call__(self, ids, cache=None, all_logits=False, n_pad=None):
        """Logits for token ids (see forward): [n_seq or 1, n_vocab] float32, or with a batch axis."""
        return self.forward(ids, cache=cache, n_pad=n_pad, all_logits=all_logits).logits
