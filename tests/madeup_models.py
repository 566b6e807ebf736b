"""A made-up decoder architecture that ringtune cannot split, registered with transformers' Auto
classes when imported (tests import it in the process that runs the command line).

``towers=2`` gives the decoder a second list of blocks beside the first; ``final_norm=False``
leaves out the norm after the blocks. Either way the slicer cannot tell what a stage holds.
"""
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel

MODEL_TYPE = "madeup-decoder"


class MadeupConfig(PreTrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size=32, hidden_size=8, num_hidden_layers=2, towers=1, final_norm=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.towers = towers
        self.final_norm = final_norm
        super().__init__(**kwargs)


class MadeupDecoder(nn.Module):
    def __init__(self, config: MadeupConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                    for _ in range(config.num_hidden_layers))
        if config.towers == 2:
            self.mirror_layers = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                               for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size) if config.final_norm else nn.Identity()


class MadeupForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MadeupConfig

    def __init__(self, config: MadeupConfig) -> None:
        super().__init__(config)
        self.model = MadeupDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden)
        return self.lm_head(self.model.norm(hidden))


AutoConfig.register(MODEL_TYPE, MadeupConfig)
AutoModelForCausalLM.register(MadeupConfig, MadeupForCausalLM)


def write_model_dir(path: Path, **config) -> Path:
    """A model directory holding only the made-up model's config.json (planning needs no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **config}))
    return path
