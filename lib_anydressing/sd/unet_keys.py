"""The diffusers <-> ldm key mapping of the SD1.x UNet, written once for every converter.

diffusers names blocks by level (down_blocks.b.resnets.a); ldm numbers them in forward order
(input_blocks.{b*(L+1)+a+1}). Inside attention blocks the names agree; inside resnets they differ.
`layers_per_block` (L) is 2 for SD1.5; tests use smaller widths with the same layer order.
"""

from __future__ import annotations

from functools import lru_cache

_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}


@lru_cache(maxsize=8)
def block_prefixes(layers_per_block: int = 2, n_levels: int = 4) -> tuple[tuple[str, str, bool], ...]:
    """(diffusers prefix, ldm prefix, is_resnet) for every block of an SD1.x-layout UNet.

    Levels 0..n-2 of the down path and 1..n-1 of the up path carry attention, as in SD1.x.
    """
    L = layers_per_block
    pairs: list[tuple[str, str, bool]] = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
    ]
    for b in range(n_levels):
        for a in range(L):
            i = b * (L + 1) + a + 1
            pairs.append((f"down_blocks.{b}.resnets.{a}.", f"input_blocks.{i}.0.", True))
            if b < n_levels - 1:
                pairs.append((f"down_blocks.{b}.attentions.{a}.", f"input_blocks.{i}.1.", False))
        if b < n_levels - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (L + 1)}.0.op.", False))
        has_attention = b > 0
        for a in range(L + 1):
            i = b * (L + 1) + a
            pairs.append((f"up_blocks.{b}.resnets.{a}.", f"output_blocks.{i}.0.", True))
            if has_attention:
                pairs.append((f"up_blocks.{b}.attentions.{a}.", f"output_blocks.{i}.1.", False))
        if b < n_levels - 1:
            last = b * (L + 1) + L
            pairs.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}.", False))
    return tuple(pairs)


def diffusers_to_ldm(key: str, layers_per_block: int = 2) -> str:
    """One diffusers UNet key -> its ldm key; KeyError for a key outside the SD1.x UNet."""
    return _translate(key, layers_per_block, to_ldm=True)


def ldm_to_diffusers(key: str, layers_per_block: int = 2) -> str:
    """One ldm UNet key -> its diffusers key (the inverse of `diffusers_to_ldm`)."""
    return _translate(key, layers_per_block, to_ldm=False)


def _translate(key: str, layers_per_block: int, *, to_ldm: bool) -> str:
    for d_prefix, l_prefix, is_resnet in block_prefixes(layers_per_block):
        source, target = (d_prefix, l_prefix) if to_ldm else (l_prefix, d_prefix)
        if key.startswith(source):
            rest = key[len(source) :]
            for d_name, l_name in _RESNET.items() if is_resnet else ():
                old, new = (d_name, l_name) if to_ldm else (l_name, d_name)
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            return target + rest
    raise KeyError(f"'{key}' is not a key of an SD1.x {'diffusers' if to_ldm else 'ldm'} UNet")


def diffusers_attention_layer(name: str, layers_per_block: int = 2) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0' -> 'input_blocks.1.1.transformer_blocks.0'."""
    return diffusers_to_ldm(name + ".", layers_per_block)[:-1]


def convert_unet(state_dict: dict, layers_per_block: int = 2) -> dict:
    """A whole diffusers UNet state dict in ldm names (values shared, not copied)."""
    return {diffusers_to_ldm(k, layers_per_block): v for k, v in state_dict.items()}


def self_attention_processor_order(layers_per_block: int = 2, n_levels: int = 4) -> list[str]:
    """diffusers' `unet.attn_processors` order restricted to attn1, as ldm layer names.

    diffusers registers mid_block after up_blocks, so the middle layer comes last: index 2*j of a
    peer's processor list (attn1, attn2 alternating) is the j-th name here.
    """
    L = layers_per_block
    names = [f"down_blocks.{b}.attentions.{a}" for b in range(n_levels - 1) for a in range(L)]
    names += [f"up_blocks.{b}.attentions.{a}" for b in range(1, n_levels) for a in range(L + 1)]
    names.append("mid_block.attentions.0")
    return [diffusers_attention_layer(f"{n}.transformer_blocks.0", L) for n in names]
