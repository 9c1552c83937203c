"""Text stages: prompts → (y, y_uncond) [B, L, D].

    stage = TextStage(graphs)          # the export's text_encoder graph (T5, or a toy's word table)
    stage = BundledToyText()           # a toy export without one: the bundled toy's word encoder
    y, y_uncond = stage.encode(["a cat"], fps=16, aspect="16:9")   # [B, L, D] each, fp32

For the graph: upstream-templated captions → tokenizer (from the export) → ``text_encoder`` graph;
templates, tokenizer files and their hashes come from the graph's manifest entry.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...errors import ManifestError
from ...export import names as n
from ..graphs import Graphs


class TextStage:
    """The export's text encoder: template options, tokenizer and graph (loaded once)."""

    def __init__(self, graphs: Graphs):
        from ...media.text import TextTemplate, load_tokenizer, tokenizer_files

        if not graphs.has(n.TEXT_ENCODER):
            raise ManifestError(f"{graphs.manifest.root} has no text_encoder graph; re-export with "
                                "`starflow-trt export ... --text-encoder DIR` or pass embeddings")
        self.graphs = graphs
        self.spec = graphs.manifest.graph(n.TEXT_ENCODER)
        self.template = TextTemplate.from_dict(self.spec.extra["template"])
        self.length = int(self.spec.dims["tokens"].max)
        #: whether the encoder reads a fixed word vocabulary (a toy's), not free text
        self.words_only = self.spec.extra.get("tokenizer") == "words"
        if self.words_only:
            self.tokenizer = WordTokenizer(self.spec.extra["vocab"], self.length)
            return
        directory = graphs.manifest.root / self.spec.extra.get("tokenizer_dir", n.TOKENIZER_DIR)
        recorded = self.spec.extra.get("tokenizer_files")
        if recorded is not None and tokenizer_files(directory) != recorded:
            raise ManifestError(f"the tokenizer files in {directory} differ from those the export recorded; "
                                "re-export or restore them")
        self.tokenizer = load_tokenizer(directory)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions (already templated) → text [B, L, D] float32 (padded rows exactly 0); any B, in chunks of
        the graph's batch range (a row's features do not depend on the other rows)."""
        rows = int(self.spec.dims["batch"].max) if "batch" in self.spec.dims else len(texts)
        if len(texts) > rows:
            return torch.cat([self.encode_texts(texts[i:i + rows]) for i in range(0, len(texts), rows)])
        from ...media.text import tokenize

        if isinstance(self.tokenizer, WordTokenizer):
            ids, mask = self.tokenizer(texts)
        else:
            ids, mask = tokenize(self.tokenizer, texts, self.length)
        dev = self.graphs.device
        out = {n.TEXT: torch.empty(*self.spec.outputs[0].concrete({"batch": ids.shape[0], "tokens": ids.shape[1]}),
                                   device=dev)}
        self.graphs.runner(n.TEXT_ENCODER).run({n.INPUT_IDS: ids.to(dev), n.ATTENTION_MASK: mask.to(dev)}, out)
        return out[n.TEXT].float().cpu()

    def encode(self, prompts: Sequence[str], fps: Optional[int] = None, aspect: Optional[str] = None,
               negative: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (y, y_uncond) [B, L, D] each; one batch [cond; uncond] like upstream; uncond = the
        template around ``""`` (or ``negative[b]``)."""
        texts = self.template.captions(prompts, fps, aspect, negative)   # each part only where its flag is on
        out = self.encode_texts(texts)
        b = len(texts) // 2
        return out[:b], out[b:]


class BundledToyText:
    """The bundled toy's word encoder, for a toy export without a text_encoder graph: the same prompts the
    server and the CLI accept (:attr:`~starflow_trt.summary.ModelSummary.prompt_encoder` ``"toy"``). The toy was
    trained on bare prompts: no template; the unconditional rows are the encoded negative prompts, else ``""``."""

    words_only = True   # its twelve words

    def __init__(self):
        from ...toy import load_bundled

        self.encoder = load_bundled().encoder

    def encode(self, prompts: Sequence[str], fps: Optional[int] = None, aspect: Optional[str] = None,
               negative: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (y, y_uncond) [B, L, D]; ``fps`` / ``aspect`` are not part of the toy's text."""
        from ...errors import InputError

        try:
            return self.encoder.encode(prompts), self.encoder.encode(negative or [""] * len(prompts))
        except ValueError as exc:   # a word outside the toy's vocabulary, or too many words
            raise InputError(str(exc)) from None


class WordTokenizer:
    """The toy's tokenizer: lower-case words → vocabulary index, padded with mask 0 (no EOS)."""

    def __init__(self, vocab: Sequence[str], length: int):
        self.vocab, self.length = list(vocab), int(length)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ...errors import InputError

        ids = torch.zeros(len(texts), self.length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, text in enumerate(texts):
            words = text.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise InputError(f"unknown word(s) {unknown} in prompt {text!r}; this model knows: "
                                 f"{' '.join(self.vocab)}")
            if len(words) > self.length:
                raise InputError(f"prompt {text!r} has {len(words)} words; this model takes at most {self.length}")
            ids[b, :len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.int64)
            mask[b, :len(words)] = 1
        return ids, mask
