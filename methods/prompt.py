"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691) and P-tuning (Liu et al., 2021, arXiv:2103.10385).

Both learn ``length`` virtual token embeddings that are put in front of the input embeddings (see
``peftkit.sites.input``, which also widens the attention mask and ignores the virtual positions in ``labels``):

- **prompt tuning** learns the embeddings directly, initialised at random, from given vocabulary tokens
  (Lester et al. sec. 3.2 find vocabulary initialisation best), or from a text;
- **P-tuning** produces them with a prompt encoder, an MLP or a bidirectional LSTM followed by an MLP (Liu et al.
  sec. 3), which ``peftkit.fold`` replaces by the embeddings it produces, for inference and saving.

Virtual tokens change the output from the start, so neither is an identity at init; neither can be merged.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit import Adapter, AttachError, Capabilities, Method, MethodConfig
from peftkit.sites.input import InputSite


class PromptConfig(MethodConfig):
    method: Literal["prompt"] = "prompt"
    target: str | list[str] = Field(default_factory=lambda: ["@input_embeddings"])
    length: int = Field(default=20, gt=0, description="number of virtual tokens")
    init: Literal["random", "vocab", "text"] = "random"
    init_tokens: list[int] | None = Field(default=None, description="vocabulary ids for init: vocab (cycled)")
    init_text: str | None = Field(default=None, description="a text whose tokens initialise the prompt (init: text)")
    tokenizer: str | None = Field(default=None, description="a local tokenizer folder, for init: text")

    @model_validator(mode="after")
    def _init_has_its_source(self) -> PromptConfig:
        if self.init == "vocab" and not self.init_tokens:
            raise ValueError("init: vocab needs init_tokens (a list of vocabulary ids)")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ValueError("init: text needs init_text and tokenizer (a local tokenizer folder)")
        return self


class PTuningConfig(MethodConfig):
    method: Literal["ptuning"] = "ptuning"
    target: str | list[str] = Field(default_factory=lambda: ["@input_embeddings"])
    length: int = Field(default=20, gt=0, description="number of virtual tokens")
    encoder: Literal["mlp", "lstm", "none"] = Field(default="mlp", description="'none' after peftkit.fold")
    encoder_hidden: int = Field(default=128, gt=0)


def _initial_ids(config: PromptConfig) -> list[int]:
    if config.init == "vocab":
        ids = list(config.init_tokens or [])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    return [ids[i % len(ids)] for i in range(config.length)]


class VirtualTokens(Adapter):
    def __init__(self, length: int, site: InputSite, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.length = length
        weight = site.module.weight
        scale = weight.detach().float().std().item() if not weight.is_meta else 1.0
        self.prompt_embedding = nn.Parameter(
            torch.randn(length, site.embedding_dim, device=site.device, dtype=site.dtype) * scale
        )
        self.encoder = encoder

    def virtual_tokens(self) -> torch.Tensor:
        """The virtual token embeddings, (length, embedding_dim)."""
        if self.encoder is None:
            return self.prompt_embedding
        return self.encoder(self.prompt_embedding)

    def fold(self) -> dict[str, Any]:
        if self.encoder is None:
            return {}
        with torch.no_grad():
            tokens = self.virtual_tokens().detach().clone()
        self.prompt_embedding, self.encoder = nn.Parameter(tokens), None
        return {"encoder": "none"}


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder: optionally a 2-layer bidirectional LSTM, then a 2-layer MLP back to the width."""

    def __init__(self, kind: str, width: int, hidden: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.lstm = (
            nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True, **factory)
            if kind == "lstm"
            else None
        )
        features = 2 * hidden if self.lstm is not None else width
        self.mlp = nn.Sequential(nn.Linear(features, hidden, **factory), nn.ReLU(), nn.Linear(hidden, width, **factory))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            embeddings = self.lstm(embeddings[None])[0][0]  # "p d -> 1 p d -> p (2 h)"
        return self.mlp(embeddings)


_CAPABILITIES = Capabilities(
    site="input", module_types=(nn.Embedding,), mergeable=False, identity_at_init=False, compose_rules=frozenset()
)


class PromptTuning(Method):
    name = "prompt"
    config = PromptConfig
    capabilities = _CAPABILITIES

    @classmethod
    def parameter_count(cls, config: PromptConfig, site: InputSite) -> int:
        return config.length * site.embedding_dim

    @classmethod
    def create(cls, config: PromptConfig, site: InputSite) -> VirtualTokens:
        adapter = VirtualTokens(config.length, site)
        if config.init != "random":
            ids = _initial_ids(config)
            vocabulary = site.module.num_embeddings
            if any(not 0 <= i < vocabulary for i in ids):  # a negative id would silently index from the end
                bad = next(i for i in ids if not 0 <= i < vocabulary)
                raise AttachError(f"prompt init token id {bad} is outside the vocabulary (0-{vocabulary - 1})")
            ids = torch.tensor(ids, device=site.device)
            with torch.no_grad():
                adapter.prompt_embedding.copy_(site.module.weight[ids])
        return adapter

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # PEFT's prompt_embeddings (length, token_dim) is peftkit's prompt_embedding on the input embedding; how the
    # virtual tokens were initialised (prompt_tuning_init) matters only at init and is not read.
    peft_type = "PROMPT_TUNING"

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import module_path, peftkit_key, refuse_features

        refuse_features(peft_config, {"num_transformer_submodules": 1})
        if set(tensors) != {"prompt_embeddings"}:
            raise CheckpointError(f"a PEFT prompt-tuning file holds only 'prompt_embeddings', found {sorted(tensors)}")
        table = tensors["prompt_embeddings"]  # "p d"
        path = module_path(model, model.get_input_embeddings())
        entry = {"method": "prompt", "target": path, "length": int(table.shape[0])}
        return [entry], {peftkit_key(path, adapter_name, "prompt_embedding"): table}

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        table = attached[0].module.prompt_embedding
        config = {
            "num_virtual_tokens": int(table.shape[0]),
            "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
        }
        return config, {"prompt_embeddings": table}


class PTuning(Method):
    name = "ptuning"
    config = PTuningConfig
    capabilities = _CAPABILITIES

    @classmethod
    def parameter_count(cls, config: PTuningConfig, site: InputSite) -> int:
        width, hidden = site.embedding_dim, config.encoder_hidden
        count = config.length * width
        if config.encoder == "none":
            return count
        if config.encoder == "lstm":
            first, second = 4 * hidden * (width + hidden + 2), 4 * hidden * (2 * hidden + hidden + 2)
            count += 2 * (first + second) + 2 * hidden * hidden + hidden
        else:
            count += width * hidden + hidden
        return count + hidden * width + width

    @classmethod
    def create(cls, config: PTuningConfig, site: InputSite) -> VirtualTokens:
        encoder = None
        if config.encoder != "none":
            encoder = PromptEncoder(config.encoder, site.embedding_dim, config.encoder_hidden, site.device, site.dtype)
        return VirtualTokens(config.length, site, encoder)
