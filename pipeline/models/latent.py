"""Latent (Stable-Diffusion-style) models as a plain eps denoiser plus a decoder.

The sampler sees latents z of shape [B, C, h, w] and a text-free contract ``(z, t) -> eps``: the prompt
is encoded once, here, and classifier-free guidance (Ho & Salimans, 2022) is folded into the denoiser.
No file I/O happens here; `pipeline.models.load.load_model` reads the checkpoint and builds these.

==================  ==================================================  ============================
name                meaning                                             diffusers
==================  ==================================================  ============================
``cond``            text-encoder states of the prompt, [1, L, D]        ``prompt_embeds``
``uncond``          states of the negative (default empty) prompt       ``negative_prompt_embeds``
``g``               guidance scale; out = out_u + g (out_c - out_u)      ``guidance_scale``
``scaling_factor``  z = scaling_factor * vae.encode(image).latent       ``vae.config.scaling_factor``
==================  ==================================================  ============================
"""

from __future__ import annotations

import torch

from pipeline.models.denoisers import DiffusersDenoiser


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
    """Prompt -> last-layer CLIP hidden states [1, L, D], padded to the encoder's length (as SD 1.x / 2.x)."""
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


class GuidedUNet(torch.nn.Module):
    """A text-conditioned UNet with the prompt bound and classifier-free guidance applied: ``(x, t) -> out``.

    Runs the UNet once on the doubled batch [uncond | cond] and returns out_u + g (out_c - out_u) in float32.
    `out` is whatever the UNet predicts (eps, v or x0): the conversion to eps is affine in `out` with
    weights summing to 1 over (out_u, out_c), so guiding before or after the conversion is the same.

    Args:
        unet: ``UNet2DConditionModel``; called as ``unet(x [2B, C, h, w], t [2B], encoder_hidden_states=[2B, L, D])``.
        cond, uncond: prompt states [1, L, D].
        guidance_scale: g; 1 gives the conditional output alone, 0 the unconditional one.
    """

    def __init__(self, unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.register_buffer("cond", cond.detach(), persistent=False)
        self.register_buffer("uncond", uncond.detach(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        states = torch.cat([self.uncond.expand(B, -1, -1), self.cond.expand(B, -1, -1)]).to(x.dtype)
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=states).sample.float()
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


class CFGDenoiser(DiffusersDenoiser):
    """Classifier-free-guided eps denoiser for a latent model: ``(z [B, C, h, w], t LongTensor[B]) -> eps``.

    The prompt states are computed once (see `encode_prompt`); the UNet runs in its own dtype and eps
    comes back in z's dtype, converted from v / x0 by the shared adapter (`DiffusersDenoiser`).

    Args:
        unet: ``UNet2DConditionModel``.
        alphas_cumprod: abar table [T] from the checkpoint's scheduler config.
        prediction_type: ``epsilon`` / ``v_prediction`` / ``sample``.
        cond, uncond: prompt / negative-prompt states [1, L, D].
        guidance_scale: g.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance_scale: float,
    ):
        super().__init__(GuidedUNet(unet, cond, uncond, guidance_scale), alphas_cumprod, prediction_type)

    @property
    def guidance_scale(self) -> float:
        return self.model.guidance_scale


class VAEDecoder(torch.nn.Module):
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (clamped), in the latents' dtype.

    Undoes the latent scaling (z / scaling_factor + shift_factor, as diffusers' pipelines) before
    ``vae.decode``; the VAE runs in its own dtype and device.
    """

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = latents.to(p.device, p.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).to(latents.device, latents.dtype)
