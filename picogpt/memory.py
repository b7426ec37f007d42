"""Memory before work: what a batch will need, what this process can still get, and a one-line refusal
when the first exceeds the second, before anything is allocated.

Every decoding path asks here first (picogpt.generate's loop and its text batches, beam search, the
drop-in's generate, corpus completion through the loop), so that a request too large ends in one
sentence naming the option to lower, never in the kernel's out-of-memory killer.
"""

import os

from .errors import PicogptError, plural


def memory_needed(hparams, n_batch, n_prompt, n_positions, use_cache=True, kept_scores=0):
    """Bytes a batch needs at its peak beyond the weights (which are mapped from the file), by part.

    n_batch rows, prompts padded to n_prompt tokens, up to n_positions tokens in all. The parts: the KV
    cache (keys and values of every layer, float32), the largest activations of one forward pass (the
    MLP's [n_batch, n_seq, 4 n_embd] and the attention weights [n_batch, n_head, n_seq, n_positions],
    each with the copy its next step makes), each step's logits with the float64 softmaxes, sums and
    sort order that sampling with top-p keeps alive at once (8 copies), and kept_scores steps' scores
    [n_batch, n_vocab] float32 kept to the end (beam search and the drop-in with output_scores). An
    estimate to refuse what cannot fit, on the generous side; not an exact count.
    """
    n_embd, n_head, n_vocab = hparams["n_embd"], hparams["n_head"], hparams["n_vocab"]
    n_seq = n_prompt if use_cache else n_positions  # the longest pass: prefill, or the last full recompute
    parts = {
        "the KV cache": 2 * hparams["n_layer"] * n_batch * n_positions * n_embd * 4 if use_cache else 0,
        "activations": 2 * 4 * n_batch * n_seq * max(4 * n_embd, n_head * n_positions),
        "logits": n_batch * n_vocab * (4 + 8 * 8 + 2),  # float32 logits, float64/int64 copies, boolean masks
    }
    if kept_scores:
        parts["the kept scores"] = kept_scores * n_batch * n_vocab * 4
    return parts


def available_memory():
    """Bytes of memory this process can still get: the system's (Linux's MemAvailable, else all of it),
    or less where a container's limit (cgroup v2 memory.max less memory.current) says so; None where
    nothing is known."""
    known = []
    try:
        with open("/proc/meminfo") as f:
            known += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not known:
        try:
            known.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                known.append(int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def check_memory(hparams, n_batch, n_prompt, n_tokens, use_cache=True, kept_scores=0,
                 remedy="ask for fewer samples or prompts at once, or fewer tokens"):
    """Refuse, in one sentence and before any work, a batch that cannot fit in the memory available:
    n_batch rows of prompts padded to n_prompt tokens, n_tokens to generate (the model sees n_ctx at most).
    remedy names what to lower (beam search: the beams)."""
    n_positions = min(n_prompt + n_tokens, hparams["n_ctx"])
    parts = memory_needed(hparams, n_batch, min(n_prompt, hparams["n_ctx"]), n_positions, use_cache, kept_scores)
    needed, available = sum(parts.values()), available_memory()
    if available is not None and needed > available:
        largest = max(parts, key=parts.get)
        raise PicogptError(f"{plural(n_batch, 'row')} of up to {plural(n_positions, 'token')} need about "
                           f"{needed / 1e9:.1f} GB of memory ({largest} {parts[largest] / 1e9:.1f} GB) but "
                           f"{available / 1e9:.1f} GB is available; {remedy}")
