"""Mask2Former's masked-attention transformer decoder (100 queries, 9 layers, post-norm).

Each layer lets every query attend only where its previous mask prediction is foreground
(masked attention), cycling over the three pixel-decoder scales, coarsest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.model.config import DecoderConfig
from dicom_node.model.position_encoding import sine_position_embedding


def mask_logits(embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N, Q, C) query embeddings x (N, C, H, W) features -> (N, Q, H, W) mask logits.

    ``einsum("bqc,bchw->bqhw")`` hands its matrix product (N, C, HW) rows, which a channels-last
    map (the backbone's layout, kept through the pixel decoder) gives only after copying the
    whole map (9 ms at stride 4 for a 1024x768 photo, every layer's smaller maps besides). Read
    as (N, HW, C) and transposed, the same map is an operand the product takes as it is.
    """
    n, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        flat = features.permute(0, 2, 3, 1).reshape(n, h * w, c).transpose(1, 2)
    else:
        flat = features.reshape(n, c, h * w)
    return torch.bmm(embedding, flat).view(n, -1, h, w)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        attended = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, attn_mask=memory_mask,
                                       need_weights=False)[0]
        return self.norm(tgt + attended)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionDecoder(nn.Module):
    """``sem_seg_head.predictor`` of the checkpoint."""

    num_feature_levels = 3

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.pre_norm:
            raise ValueError("pre-norm decoders are not supported (the M2FP checkpoint is post-norm)")
        d = cfg.hidden_dim
        self.num_heads = cfg.nheads
        self.num_layers = cfg.dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(d, cfg.nheads)
                                                               for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(d, cfg.nheads)
                                                                for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(d, cfg.dim_feedforward) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(self.num_feature_levels, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor,
                with_aux: bool = False) -> dict[str, torch.Tensor]:
        """Class logits (N, Q, K+1) and stride-4 mask logits (N, Q, H/4, W/4) of the last layer.

        The reference code draws every layer's masks at stride 4 and then shrinks them to the
        attention scale. Bilinear resizing and the query-feature product are both linear, so we
        shrink ``mask_features`` once per scale and draw the attention masks there: the same
        numbers up to rounding, at a fraction of the cost. Only the last layer's masks are drawn
        at stride 4.
        """
        src, pos, sizes = [], [], []
        n = mask_features.shape[0]
        for i, x in enumerate(multi_scale):
            h, w = int(x.shape[2]), int(x.shape[3])
            sizes.append((h, w))
            pos.append(sine_position_embedding(h, w, x.shape[1] // 2, device=x.device).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        features_at = [F.interpolate(mask_features, size=s, mode="bilinear", align_corners=False) for s in sizes]

        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, n, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, n, 1)
        aux_logits = []
        logits, attn_mask = self._heads(output, features_at[0])
        aux_logits.append(logits)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # A query whose mask is empty everywhere may look everywhere (else softmax of nothing).
            # (A broadcast AND, not an indexed assignment: the same values, and an exported
            # graph keeps no data-dependent shape.)
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            if i < self.num_layers - 1:
                logits, attn_mask = self._heads(output, features_at[(i + 1) % self.num_feature_levels])
                aux_logits.append(logits)
        decoded = self.decoder_norm(output).transpose(0, 1)
        out = {
            "pred_logits": self.class_embed(decoded),
            "pred_masks": mask_logits(self.mask_embed(decoded), mask_features),
        }
        if with_aux:
            out["aux_pred_logits"] = torch.stack(aux_logits, 1)  # (N, layers, Q, K+1)
        return out

    def _heads(self, output: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(decoded)
        # sigmoid(x) < 0.5  <=>  x < 0
        masked = mask_logits(self.mask_embed(decoded), features).flatten(2) < 0
        if masked.shape[0] == 1:
            # one image: a 2-D (Q, HW) mask is shared by all heads, no per-head copy needed
            return logits, masked[0]
        return logits, masked.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
