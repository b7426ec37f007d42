"""Training's parts: the model and its optimizer, the next-token loss, the schedule, checkpoints, model.dat.

The architecture and tokenizer are GPT-2's exactly (transformers' GPT2LMHeadModel with a tied output
layer, GPT-2's 50257-token BPE); only the sizes are small, so that the weights fit in 30 MB. The token
embedding alone is 50257 x n_embd numbers, so the file stores the weight matrices as bfloat16 (model.dat
version 2), which buys a model twice as wide as float32 would.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import picogpt
from picogpt.modelfile import ModelFileWriter
from picogpt.reference import hf_model
from picogpt.scoring import score
from picogpt.tensors import gpt2_tensor_specs, hf_to_model_dat_name
from picogpt.tokenizer import EOT, N_VOCAB

# bfloat16 matrices: 50257 x 192 x 2 bytes = 19.3 MB of embedding, 0.9 MB per layer, 26.4 MB in all.
HPARAMS = dict(n_vocab=N_VOCAB, n_ctx=256, n_embd=192, n_head=6, n_layer=8, layer_norm_epsilon=1e-5)
WEIGHT_DTYPE = "bf16"
MAX_FILE_BYTES = 30_000_000
BATCH_SIZE, BLOCK_SIZE = 8, 256  # sequences per step, tokens per sequence (= n_ctx, so every position trains)
LR, MIN_LR, WARMUP, WEIGHT_DECAY, DROPOUT = 1e-3, 1e-5, 200, 0.1, 0.0
# The schedule's stable phase ends when the held-out loss has improved by less than PLATEAU nats over the
# last PATIENCE evaluations (or at --max-steps); the decay then lasts DECAY_FRACTION of the steps before it.
PLATEAU, PATIENCE, DECAY_FRACTION = 0.01, 3, 0.2
EVAL_EVERY, EVAL_WINDOWS = 250, 96  # steps between evaluations; windows of BLOCK_SIZE tokens evaluated


def new_model():
    """A GPT2LMHeadModel of HPARAMS' shape, freshly initialised (from PyTorch's global generator), training."""
    config = GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"], n_embd=HPARAMS["n_embd"],
                        n_layer=HPARAMS["n_layer"], n_head=HPARAMS["n_head"],
                        layer_norm_epsilon=HPARAMS["layer_norm_epsilon"], activation_function="gelu_new",
                        resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    return GPT2LMHeadModel(config).train()


def adamw(model):
    """AdamW with weight decay on matrices only (not on biases and layer-norm gains), as GPT-2
    reimplementations do."""
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))


def load_weights(model, model_file):
    """Put a model.dat's weights (bfloat16 matrices widened exactly) into a GPT2LMHeadModel."""
    model.transformer.load_state_dict(hf_model(model_file.hparams, model_file.tensors).transformer.state_dict())


def frozen_model(model_file):
    """A model.dat's weights in a model that does not train: what the sequence-level steps consult."""
    model = new_model().eval().requires_grad_(False)
    load_weights(model, model_file)
    return model


def fixed_windows(stream, n):
    """n windows of BLOCK_SIZE + 1 tokens spread evenly over a stream: the fixed sample a loss is measured on."""
    starts = np.linspace(0, len(stream) - BLOCK_SIZE - 1, n).astype(int).tolist()
    return torch.stack([torch.from_numpy(stream[s:s + BLOCK_SIZE + 1]).long() for s in starts])


def random_windows(stream, length, batches, with_next=False):
    """BATCH_SIZE windows of the token stream, at offsets below len(stream) - length drawn from `batches`:
    [BATCH_SIZE, length], or [BATCH_SIZE, length + 1] with each window's next token (a training target)."""
    starts = torch.randint(len(stream) - length, (BATCH_SIZE,), generator=batches)
    n = length + with_next
    return torch.stack([torch.from_numpy(stream[s:s + n]).long() for s in starts.tolist()])


def lm_loss(model, windows, bf16, token_unlikelihood=0.0):
    """Mean cross-entropy of each next token given those before it, over windows [batch, BLOCK_SIZE + 1].

    The same as GPT2LMHeadModel(x, labels=x).loss, without its shifted copy of the [batch, BLOCK_SIZE,
    n_vocab] logits (the output layer is most of the work with a 50257-token vocabulary). With bf16, the
    products run in bfloat16 (autocast) and the loss in float32; the weights stay float32. A
    token_unlikelihood weight adds that times previous_token_unlikelihood.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.transformer(windows[:, :-1]).last_hidden_state
        logits = model.lm_head(hidden)  # [batch, BLOCK_SIZE, n_vocab]
    if not token_unlikelihood:
        return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return (F.nll_loss(log_probs.flatten(0, 1), windows[:, 1:].flatten())
            + token_unlikelihood * previous_token_unlikelihood(log_probs, windows))


def previous_token_unlikelihood(log_probs, windows):
    """Token-level unlikelihood (Welleck et al. 2019) on real text: at each position, -log(1 - p) summed
    over the distinct tokens already in the window that are not the next one, averaged over positions.
    log_probs [batch, n, n_vocab] predict windows [batch, n + 1]'s tokens 1..n.

    Cross-entropy raises the right token; this also lowers the wrong ones that copying the context would
    give, the habit a greedy loop grows from, and it does so on human text rather than on the model's own
    (where the freed probability can drift to rare tokens)."""
    batch, n, _ = log_probs.shape
    context, targets = windows[:, :-1], windows[:, 1:]  # [batch, n] each
    same = context[:, :, None] == context[:, None, :]  # [batch, n, n]: token i is token j
    seen_before = (same & torch.ones(n, n, dtype=torch.bool).tril(-1)).any(-1)  # [batch, n]: j repeats an earlier one
    # candidates[b, t, j]: at position t, context token j (once per distinct token) counts against the model
    candidates = (torch.ones(n, n, dtype=torch.bool).tril() & ~seen_before[:, None, :]
                  & (context[:, None, :] != targets[:, :, None]))
    p = log_probs.gather(-1, context[:, None, :].expand(batch, n, n)).exp()  # [batch, n, n]: p(token j) at t
    return -(torch.log(torch.clamp(1 - p, min=1e-5)) * candidates).sum() / (batch * n)


@torch.no_grad()
def evaluate(model, windows, bf16):
    """Mean next-token cross-entropy (nats per token) over the windows, without dropout."""
    model.eval()
    total = 0.0
    for chunk in windows.split(16):
        total += lm_loss(model, chunk, bf16).item() * len(chunk)
    model.train()
    return total / len(windows)


class Schedule:
    """Warmup-stable-decay: a linear warm-up to LR, LR while the held-out loss improves, then a linear decay
    to MIN_LR over DECAY_FRACTION of the steps trained so far. The decay starts when the held-out loss has
    improved by less than PLATEAU over the last PATIENCE evaluations, or in time to end at max_steps."""

    def __init__(self, max_steps, decay_start=None, decay_steps=None, val_losses=()):
        self.max_steps, self.decay_start, self.decay_steps = max_steps, decay_start, decay_steps
        self.val_losses = list(val_losses)

    def lr(self, step):  # step counts from 0
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        if self.decay_start is None or step < self.decay_start:
            return LR
        return LR - (LR - MIN_LR) * min(1.0, (step - self.decay_start + 1) / self.decay_steps)

    @property
    def end(self):
        return None if self.decay_start is None else self.decay_start + self.decay_steps

    def evaluated(self, step, val_loss):
        """Record an evaluation after `step` steps; returns why the decay starts now, or None."""
        self.val_losses.append(val_loss)
        if self.decay_start is not None:
            return None
        recent = self.val_losses[-PATIENCE - 1:]
        why = None
        if len(recent) > PATIENCE and recent[0] - min(recent[1:]) < PLATEAU:
            why = f"the held-out loss improved by less than {PLATEAU} over the last {PATIENCE} evaluations"
        elif step * (1 + DECAY_FRACTION) >= self.max_steps:
            why = f"--max-steps {self.max_steps} is near"
        if why:
            self.decay_start = step
            self.decay_steps = max(1, self.max_steps - step) if why.startswith("--") else round(DECAY_FRACTION * step)
        return why


def save_checkpoint(path, model, optimizer, batches, state):
    """Everything training needs to go on exactly where it stopped, in one safetensors file (no pickle),
    replaced atomically: the weights, AdamW's moments, the data order's generator, PyTorch's own random
    state, and `state` (JSON)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.transformer.state_dict().items()}
    for i, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            tensors[f"adam.{i}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    tensors["batches"] = batches.get_state()
    tensors["torch_rng"] = torch.get_rng_state()  # dropout's random numbers, when there is dropout
    partial = Path(path).with_name(Path(path).name + ".partial")
    save_file(tensors, partial, metadata={"state": json.dumps(state)})
    os.replace(partial, path)


def load_checkpoint(path, model, optimizer, batches):
    """Restore what save_checkpoint wrote; returns its state."""
    with safe_open(path, "pt") as f:
        state = json.loads(f.metadata()["state"])
    tensors = load_file(path)
    model.transformer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    saved = optimizer.state_dict()
    for i in range(len(list(model.parameters()))):
        if f"adam.{i}.exp_avg" in tensors:
            saved["state"][i] = {"step": tensors[f"adam.{i}.step"].reshape(()),
                                 "exp_avg": tensors[f"adam.{i}.exp_avg"],
                                 "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"]}
    optimizer.load_state_dict(saved)
    batches.set_state(tensors["batches"])
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
    return state


def write_model(model, path):
    """Write the weights through picogpt's ModelFileWriter (Conv1D weights are already [n_in, n_out])."""
    state = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight, "the output layer must be tied to wte"
    # hf_to_model_dat_name gives None for lm_head.weight (the tied wte) and anything that is not a weight.
    tensors = {name: v.detach().numpy() for k, v in state.items() if (name := hf_to_model_dat_name(k))}
    assert set(tensors) == set(gpt2_tensor_specs(HPARAMS)), "state dict does not map onto model.dat"
    with ModelFileWriter(path, HPARAMS, weight_dtype=WEIGHT_DTYPE) as out:
        for name, array in tensors.items():
            out.write(name, array)


def held_out_perplexity(model_path, docs, encoding):
    """picogpt's own perplexity over every held-out document (each after <|endoftext|>, longer ones in
    sliding windows): the number the model card compares between models, on the file as shipped."""
    model = picogpt.load(model_path, quiet=True)
    total_log_prob, n_tokens = 0.0, 0
    for doc in docs:
        result = score(model, [EOT] + encoding.encode_ordinary(doc))
        total_log_prob += result.log_prob
        n_tokens += result.n_tokens
    return n_tokens, math.exp(-total_log_prob / n_tokens)
