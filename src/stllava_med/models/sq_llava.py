"""SQ-LLaVA / STLLaVA-Med as a Hugging Face model: LLaVA with the prototype-extractor ("cluster") projector.

The official code (``mm_projector_type: cluster``; ``llava/model/multimodal_projector/cluster.py`` of
heliossun/SQ-LLaVA, the same file in heliossun/STLLaVA-Med) puts a clustering module in front of LLaVA's 2-layer
MLP. Per image, with the vision tower's selected states ``x`` (L tokens x D channels; L = 576 for CLIP-L/336):

1. ``value = v(x)`` normalised over the *token* axis (the official code normalises ``v(x)`` after permuting it to
   D x L, so each channel has unit norm across tokens); ``feature = f(x)``;
2. N centres (256) and their features are adaptive average pools of ``x`` and of ``feature`` along the tokens;
3. ``iterations`` (2) times: ``centres = c(centres)``; each token's soft assignment over centres is a softmax
   (over the centres) of unit-norm centres . value; ``centres = assignment @ feature``;
4. ``similarity = sigmoid(beta + alpha * cos(centres, x))`` (learnable scalars ``sim_alpha`` / ``sim_beta``),
   kept only at each token's most similar centre (hard assignment);
5. each centre aggregates its members' features, weighted by similarity, plus its pooled feature, divided by
   (members + 1); each token gets ``x + similarity * its centre's aggregate``;
6. the MLP: ``linear_2(quick_gelu(linear_1(.)))`` (the official MLP uses QuickGELU, unlike LLaVA's ``mlp2x_gelu``).

So the projector keeps one output row per input token (576 image tokens, as LLaVA-1.5) and the LLaVA machinery
(image-token expansion, processor, generation) is unchanged. Parameter names follow the official module (``c``,
``v``, ``f``, ``sim_alpha``, ``sim_beta``) and llava-hf's for the MLP (``linear_1`` / ``linear_2``, the official
``mlp.0`` / ``mlp.2``). The official ``ln_1`` LayerNorm is constructed but never used in its forward; it is not
carried over.

Importing this module registers ``model_type: sq_llava`` with ``AutoConfig`` / ``AutoModel`` /
``AutoModelForImageTextToText``, so a converted directory loads with the Auto classes without
``trust_remote_code`` once ``stllava_med`` is imported (the family layer imports it).
"""

# No ``from __future__ import annotations``: transformers reads ``config: SQLlavaConfig`` as the config class.
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llava.configuration_llava import LlavaConfig
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)

__all__ = ["SQLlavaConfig", "SQLlavaClusterProjector", "SQLlavaModel", "SQLlavaForConditionalGeneration"]


@strict
class SQLlavaConfig(LlavaConfig):
    r"""A :class:`~transformers.LlavaConfig` whose projector is SQ-LLaVA's prototype extractor + 2-layer MLP.

    cluster_num_centers (`int`, 256): the centres (prototypes) pooled from the image tokens (official: 256).
    cluster_iterations (`int`, 2): the soft-assignment refinement iterations (official: 2).
    projector_hidden_act: the MLP's activation; the official cluster MLP uses QuickGELU.
    """

    model_type = "sq_llava"

    cluster_num_centers: int = 256
    cluster_iterations: int = 2
    projector_hidden_act: str = "quick_gelu"


class SQLlavaClusterProjector(nn.Module):
    """Prototype extractor followed by the 2-layer MLP (see the module docstring for the math)."""

    def __init__(self, config: SQLlavaConfig):
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        channels = config.vision_config.hidden_size * layers
        hidden = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.num_centers = int(config.cluster_num_centers)
        self.iterations = int(config.cluster_iterations)
        self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))
        self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
        self.c = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.f = nn.Linear(channels, channels)
        self.linear_1 = nn.Linear(channels, hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, N, D): adaptive average pooling along the tokens."""
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_centers).transpose(1, 2)

    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        """The image tokens with their cluster information added, (B, L, D) -> (B, L, D)."""
        value = F.normalize(self.v(x), dim=1)  # unit norm per channel across the tokens, as the official code
        feature = self.f(x)
        centres = self._pool(x)
        centre_features = self._pool(feature)
        for _ in range(self.iterations):
            centres = self.c(centres)
            soft = torch.softmax(F.normalize(centres, dim=-1) @ value.transpose(1, 2), dim=1)  # (B, N, L)
            centres = soft @ feature
        cosine = F.normalize(centres, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # (B, N, L)
        similarity = torch.sigmoid(self.sim_beta + self.sim_alpha * cosine)
        nearest = similarity.argmax(dim=1, keepdim=True)
        membership = torch.zeros_like(similarity).scatter_(1, nearest, 1.0)
        weights = similarity * membership  # each token keeps its most similar centre only
        aggregate = (weights @ feature + centre_features) / (membership.sum(dim=-1, keepdim=True) + 1.0)
        return x + weights.transpose(1, 2) @ aggregate

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.cluster(image_features))))


def _init_cluster(module: nn.Module) -> None:
    if isinstance(module, SQLlavaClusterProjector):
        init.ones_(module.sim_alpha)
        init.zeros_(module.sim_beta)


class SQLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: SQLlavaConfig

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_cluster(module)


class SQLlavaModel(SQLlavaPreTrainedModel, LlavaModel):
    """:class:`~transformers.LlavaModel` with the cluster projector as ``multi_modal_projector``."""

    def __init__(self, config: SQLlavaConfig):
        SQLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = SQLlavaClusterProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class SQLlavaForConditionalGeneration(SQLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """:class:`~transformers.LlavaForConditionalGeneration` over :class:`SQLlavaModel`: forward, generation,
    ``get_image_features`` and the weight layout are LLaVA's (projector parameters aside)."""

    def __init__(self, config: SQLlavaConfig):
        SQLlavaPreTrainedModel.__init__(self, config)
        self.model = SQLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register(SQLlavaConfig.model_type, SQLlavaConfig, exist_ok=True)
AutoModel.register(SQLlavaConfig, SQLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(SQLlavaConfig, SQLlavaForConditionalGeneration, exist_ok=True)
