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

import numpy as np

from .blas import matmul  # a @ b through the selected BLAS library (picogpt.blas.use)
from .errors import PicogptError
from .modelfile import open_model_file


def gelu(x):
    """Gaussian error linear unit, GPT-2's tanh approximation of x * Phi(x)."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    """Softmax over the last axis; subtracting the max keeps exp() from overflowing."""
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    """Normalise each row to mean 0 and variance 1, then scale by g and shift by b."""
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b


def linear(x, w, b):
    """A fully connected layer: [n, n_in] @ [n_in, n_out] + [n_out] -> [n, n_out]."""
    return matmul(x, w) + b


def causal_mask(n_seq, n_past):
    """Additive mask [n_seq, n_past + n_seq]: token i (at position n_past + i) sees positions <= its own."""
    return np.triu(np.full((n_seq, n_past + n_seq), -np.inf, dtype=np.float32), k=n_past + 1)


def attention(q, k, v, mask):
    """Scaled dot-product attention, all heads at once.

    q [n_head, n_seq, head_dim], k and v [n_head, n_kv, head_dim], mask [n_seq, n_kv]
    -> [n_head, n_seq, head_dim]. With a cache n_kv = n_past + n_seq, without one n_kv = n_seq.
    """
    scores = matmul(q, k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])  # [n_head, n_seq, n_kv]
    return matmul(softmax(scores + mask), v)


def split_heads(x, n_head):
    """[n_seq, n_embd] -> [n_head, n_seq, head_dim]"""
    n_seq, n_embd = x.shape
    return x.reshape(n_seq, n_head, n_embd // n_head).transpose(1, 0, 2)


def merge_heads(x):
    """[n_head, n_seq, head_dim] -> [n_seq, n_embd]"""
    n_head, n_seq, head_dim = x.shape
    return x.transpose(1, 0, 2).reshape(n_seq, n_head * head_dim)


def mha(x, c_attn, c_proj, n_head, mask, cache=None):
    """Multi-head causal self-attention: [n_seq, n_embd] -> [n_seq, n_embd]."""
    qkv = linear(x, **c_attn)  # [n_seq, 3*n_embd]
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # 3 x [n_head, n_seq, head_dim]
    if cache is not None:
        # The keys and values of earlier positions were computed by earlier calls: store ours beside
        # them and attend over all of them.  [n_head, n_seq, head_dim] -> [n_head, n_past + n_seq, head_dim]
        k, v = cache.extend(k, v)
    heads = attention(q, k, v, mask)  # [n_head, n_seq, head_dim]
    return linear(merge_heads(heads), **c_proj)  # [n_seq, n_embd]


def mlp(x, c_fc, c_proj):
    """Position-wise feed-forward network: [n_seq, n_embd] -> [n_seq, 4*n_embd] -> [n_seq, n_embd]."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def block(x, layer, n_head, eps, mask, cache=None):
    """One transformer block, pre-LN with residual connections: [n_seq, n_embd] -> [n_seq, n_embd].

    `layer` holds this block's weights under the checkpoint's names: ln_1, attn, ln_2, mlp.
    """
    x = x + mha(layer_norm(x, **layer["ln_1"], eps=eps), **layer["attn"], n_head=n_head, mask=mask, cache=cache)
    x = x + mlp(layer_norm(x, **layer["ln_2"], eps=eps), **layer["mlp"])
    return x


def gpt2(ids, wte, wpe, blocks, ln_f, n_head, eps, cache=None, all_logits=False):
    """GPT-2: token ids [n_seq] -> next-token logits [n_seq, n_vocab], or [1, n_vocab] for the last only.

    With a cache, `ids` are the tokens after the n_past already in it (the whole prompt on the first
    call, "prefill"; then one new token per call, "decode"), and the cache grows by n_seq.
    """
    n_past = cache[0].length if cache is not None else 0
    n_seq = len(ids)
    x = wte[ids] + wpe[n_past:n_past + n_seq]  # token + position embeddings: [n_seq, n_embd]
    mask = causal_mask(n_seq, n_past)  # [n_seq, n_past + n_seq]
    for i, layer in enumerate(blocks):
        x = block(x, layer, n_head=n_head, eps=eps, mask=mask, cache=None if cache is None else cache[i])
    if not all_logits:
        x = x[-1:]  # generating needs the next token after the last position only
    x = layer_norm(x, **ln_f, eps=eps)
    return matmul(x, wte.T)  # the output projection shares the token embedding: [n, n_embd] -> [n, n_vocab]


class LayerCache:
    """One layer's keys and values for the positions seen so far, preallocated for n_ctx positions."""

    def __init__(self, n_head, n_ctx, head_dim):
        # np.zeros asks the OS for zeroed pages, which cost no memory until written.
        self.keys = np.zeros((n_head, n_ctx, head_dim), dtype=np.float32)
        self.values = np.zeros((n_head, n_ctx, head_dim), dtype=np.float32)
        self.length = 0  # positions filled

    def extend(self, k, v):
        """Write k, v [n_head, n_seq, head_dim] after the stored ones; return all [n_head, length, head_dim]."""
        start, self.length = self.length, self.length + k.shape[1]
        self.keys[:, start:self.length] = k
        self.values[:, start:self.length] = v
        return self.keys[:, :self.length], self.values[:, :self.length]


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

    def new_cache(self):
        """An empty KV cache: one LayerCache per layer."""
        h = self.hparams
        return [LayerCache(h["n_head"], h["n_ctx"], h["n_embd"] // h["n_head"]) for _ in range(h["n_layer"])]

    def __call__(self, ids, cache=None, all_logits=False):
        """Logits for token ids [n_seq] (after the cache's positions): [n_seq or 1, n_vocab] float32."""
        h = self.hparams
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("ids must be a non-empty 1-D sequence of integer token ids")
        if ids.min() < 0 or ids.max() >= h["n_vocab"]:
            raise PicogptError(f"token id {int(ids.max() if ids.max() >= h['n_vocab'] else ids.min())} is "
                               f"outside this model's vocabulary of {h['n_vocab']}")
        n_past = cache[0].length if cache is not None else 0
        if n_past + len(ids) > h["n_ctx"]:
            raise PicogptError(f"{n_past + len(ids)} positions exceed the model's context of {h['n_ctx']} "
                               f"tokens; use a shorter prompt or fewer new tokens")
        return gpt2(ids, **self.params, n_head=h["n_head"], eps=h["layer_norm_epsilon"], cache=cache,
                    all_logits=all_logits)
