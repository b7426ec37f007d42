"""What the sequence-level steps continue (--unlikelihood-prefixes): mid-document windows, documents'
first tokens, or documents' first sentences, drawn from the training stream by the run's seeded generator."""

import re

import numpy as np
import torch

from picogpt.tokenizer import EOT, N_VOCAB

from .judging import STOP
from .training import BATCH_SIZE, random_windows

UL_PREFIX = 32  # tokens of a window, and the longest first sentence continued
UL_OPENING = 6  # a document's first tokens, as short as a prompt


def document_openings(stream):
    """The offsets of the documents in a token stream that have at least UL_OPENING tokens: each just after
    an <|endoftext|>, with none among its first UL_OPENING tokens."""
    starts = np.flatnonzero(stream[:-UL_OPENING] == EOT) + 1
    ends = np.append(np.flatnonzero(stream == EOT)[1:], len(stream))[:len(starts)]  # each document's next EOT
    return starts[ends - starts >= UL_OPENING]


def random_openings(stream, openings, batches):
    """The first UL_OPENING tokens of BATCH_SIZE documents drawn from `batches`: [BATCH_SIZE, UL_OPENING]."""
    picks = torch.randint(len(openings), (BATCH_SIZE,), generator=batches).tolist()
    return torch.stack([torch.from_numpy(stream[openings[i]:openings[i] + UL_OPENING]).long() for i in picks])


def sentence_ends(encoding):
    """Which token ids [N_VOCAB] end in a full stop, ! or ? (then closing quotes or brackets), and which begin
    with whitespace: a sentence ends at the first kind when the second kind or <|endoftext|> follows (no
    GPT-2 token holds a stop and then whitespace, so this is judging's SENTENCE_END read on tokens)."""
    texts = [encoding.decode([i]) for i in range(N_VOCAB)]
    return (np.array([re.search(STOP + "$", text) is not None for text in texts]),
            np.array([text[:1].isspace() for text in texts]))


def document_sentences(stream, ends_sentence, starts_space, longest=UL_PREFIX):
    """Each document's first sentence, where it ends within `longest` tokens: {length: offsets} of the
    documents (each just after an <|endoftext|>), grouped by the sentence's length in tokens."""
    followed = np.append(starts_space[stream[1:]] | (stream[1:] == EOT), True)  # [len(stream)]
    ends = np.flatnonzero(ends_sentence[stream] & followed & (stream != EOT))  # offsets of sentence ends
    starts = np.flatnonzero(stream[:-1] == EOT) + 1
    next_eot = np.append(np.flatnonzero(stream == EOT)[1:], len(stream))[:len(starts)]
    at = np.searchsorted(ends, starts)
    found = at < len(ends)
    starts, next_eot, first_end = starts[found], next_eot[found], ends[at[found]]
    lengths = first_end - starts + 1
    keep = (first_end < next_eot) & (lengths <= longest)
    return {int(n): starts[keep][lengths[keep] == n] for n in np.unique(lengths[keep])}


def random_sentences(stream, sentences, batches):
    """BATCH_SIZE documents' first sentences, all of one length (so that no batch needs padding), drawn
    from `batches`: the length of a random document's, then BATCH_SIZE documents of that length (with
    replacement, so a rare length repeats some): [BATCH_SIZE, that length]. Lengths come as often as
    documents have them."""
    lengths = np.concatenate([np.full(len(offsets), n) for n, offsets in sentences.items()])
    n = int(lengths[torch.randint(len(lengths), (1,), generator=batches).item()])
    picks = torch.randint(len(sentences[n]), (BATCH_SIZE,), generator=batches).tolist()
    return torch.stack([torch.from_numpy(stream[sentences[n][i]:sentences[n][i] + n]).long() for i in picks])


class Prefixes:
    """The prefixes of one kind over a training stream: "windows", random UL_PREFIX-token windows;
    "openings", documents' first UL_OPENING tokens; "sentences", openings and documents' whole first
    sentences (up to UL_PREFIX tokens) in turn."""

    def __init__(self, kind, stream, encoding):
        self.kind, self.stream = kind, stream
        self.openings = document_openings(stream)
        self.sentences = document_sentences(stream, *sentence_ends(encoding)) if kind == "sentences" else None

    def batch(self, turn, batches):
        """The prefixes of the `turn`-th sequence-level step (counting from 0): [BATCH_SIZE, n]."""
        if self.kind == "windows":
            return random_windows(self.stream, UL_PREFIX, batches)
        if self.kind == "sentences" and turn % 2:
            return random_sentences(self.stream, self.sentences, batches)
        return random_openings(self.stream, self.openings, batches)
