"""The ``T2IModel`` adapter around diffusers / transformers parts, and ``load_model``.

Introduced in ``notebooks/00_setup_and_tour.ipynb`` and ``notebooks/01_diffusion_basics.ipynb``.

One adapter serves three kinds of model (``model.family``, an entry of ``families.FAMILIES``):

* ``"tiny"``: the bundled model (``load_model("tiny")``): a diffusers ``UNet2DConditionModel`` on 4x4-patchified
  pixels (a 32x32x3 image is an 8x8x48 "latent", ``pixel_unshuffle``), a small transformers ``CLIPTextModel``
  and a ``CLIPTokenizer`` with the world's vocabulary, a v-prediction DDIM scheduler (built and trained by
  ``train_tiny``);
* ``"sd"``: a Stable Diffusion 1.x pipeline (``load_model(hub_id_or_path)``), whose latents come from the VAE
  times its scaling factor;
* ``"sdxl"``: a Stable Diffusion XL pipeline (``load_model(folder_or_id)`` of a ``StableDiffusionXLPipeline``): two
  text encoders, whose penultimate hidden states are concatenated into the 2048-wide context that ``attn2`` reads,
  and the second encoder's pooled (projected) embedding and the size conditioning ("time ids") that enter the UNet
  beside the timestep.

A condition ``c`` (what :meth:`T2IModel.embed` returns and :meth:`T2IModel.eps` takes) is ``(B, L, d_ctx)``, the
cross-attention context; on SDXL ``(B, L, d_ctx + d_pool)``: every row carries the prompt's pooled embedding after its
context, so that a condition stays one tensor through ``cat``/``expand``/slicing and gradients (textual inversion).
:meth:`T2IModel.context` cuts it back to what ``to_k``/``to_v`` read (the identity on SD 1.x and the tiny model):
every key/value computation (null spaces, closed forms) goes through it.

Every method in the library talks to the model only through this class. Tensor shapes: prompts embed to
``(B, L, d_in)`` (``L`` = tokenizer length, every row kept); latents are ``(B, C, H, W)``; the edited matrices
``attn2.to_k.weight`` / ``attn2.to_v.weight`` are ``(d_out, d_in)`` as torch stores them.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch.func import functional_call
from tqdm.auto import tqdm

from . import config, families
from .config import BadType, BadValue


def prompt_list(prompts) -> list:
    """A prompt or a list of prompts as a list (:class:`~sepme_lib.config.BadType` for anything else)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise BadType(f"prompts must be a string or a list of strings, got {type(prompts).__name__} {prompts!r:.60}")
    return list(prompts)


class T2IModel:
    """Text-to-image diffusion model with the operations the course needs.

    Attributes: ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` (DDIM), ``vae`` (``None`` for
    the tiny pixel model), ``patch`` (patch size of the tiny model, else ``None``), ``device``.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, patch=None, name="model",
                 vocabulary=None, device=None, guidance=7.5, sample_steps=50, family=None, text_encoder_2=None,
                 tokenizer_2=None, zero_empty=False):
        self.device = torch.device(device) if device is not None else config.get_device()
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False) if vae is not None else None
        self.tokenizer = tokenizer
        # SDXL: the second text encoder (with projection) and its tokenizer; the size conditioning
        # (original size, crop corner, target size: the pipeline's default ``_get_add_time_ids``); the empty prompt
        # as zeros (the pipeline's ``force_zeros_for_empty_prompt``)
        self.text_encoder_2 = (text_encoder_2.to(self.device).eval().requires_grad_(False)
                               if text_encoder_2 is not None else None)
        self.tokenizer_2 = tokenizer_2
        self.context_dim = int(unet.config.cross_attention_dim)
        self.time_ids = None
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            if text_encoder_2 is None or vae is None:
                raise BadValue("this UNet takes pooled text embeddings and time ids (SDXL): give text_encoder_2, "
                               "tokenizer_2 and the VAE")
            side = float(unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))
            self.time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device)
        self.zero_empty = bool(zero_empty)
        self.scheduler = scheduler
        self.patch = patch
        self.name = name
        self.family = family or families.model_family(name).name  # its entry in families.FAMILIES
        self.vocabulary = set(vocabulary) if vocabulary else None
        self.guidance = guidance
        self.sample_steps = sample_steps
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._empty = None
        self._fingerprint = None
        self._warned: set = set()  # unknown words already warned about (once per word)

    # ------------------------------------------------------------------------------------ text side
    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` the bundled model never saw in training (always ``[]`` for Stable Diffusion)."""
        if self.vocabulary is None:
            return []
        return [w for w in prompt.lower().replace(",", " ").split() if w not in self.vocabulary]

    def check_prompt(self, prompt) -> None:
        """Refuse what the text encoder cannot read faithfully, and warn (once per word) about unknown words.

        * not a string -> ``TypeError``;
        * more tokens than the tokenizer's length ``L`` -> ``ValueError`` (truncation would silently cut words,
          possibly the concept's: two different prompts would then embed identically);
        * on the bundled model, a word it never saw is spelled out letter by letter: a ``UserWarning`` names it
          the first time it is used.
        """
        if not isinstance(prompt, str):
            raise BadType(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r}")
        n = len(self.tokenizer(prompt, truncation=False).input_ids)
        if n > self.max_length:
            raise BadValue(f"the prompt {prompt!r} has {n} tokens (with BOS/EOS) but this model reads at most "
                             f"{self.max_length}; the rest would be cut silently. Shorten the prompt.")
        new = [w for w in self.unknown_words(prompt) if w not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"the {self.name} model never saw the word(s) {new} in training (it spells them letter by "
                          f"letter); its known words are: {', '.join(sorted(self.vocabulary))}", stacklevel=3)

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with BOS and EOS, no padding (at most ``L``)."""
        self.check_prompt(prompt)
        return self.tokenizer(prompt, truncation=True, max_length=self.max_length).input_ids

    def word_count(self, prompt: str) -> int:
        """Number of word tokens of ``prompt`` (no BOS/EOS)."""
        return max(0, len(self.token_ids(prompt)) - 2)

    @torch.no_grad()
    def embed(self, prompts) -> torch.Tensor:
        """``c = text_encoder(tokenizer(prompt, padding="max_length")).last_hidden_state``: ``(B, L, d_in)``.

        Every row (BOS, words, EOS, padding) is kept: it is exactly what ``attn2.to_k``/``to_v`` read. SDXL: the
        condition of the module docstring, ``[h_1 | h_2 | pooled]`` per row (``h_i``: encoder ``i``'s penultimate
        hidden states, as ``StableDiffusionXLPipeline.encode_prompt`` builds them).
        """
        prompts = prompt_list(prompts)
        if not prompts:
            raise BadValue("no prompts to embed: pass a string or a non-empty list of strings")
        for p in prompts:
            self.check_prompt(p)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        ids_2 = (None if self.tokenizer_2 is None else
                 self.tokenizer_2(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device))
        return self.encode_tokens(ids, ids_2)

    def encode_tokens(self, ids: torch.Tensor, ids_2: torch.Tensor | None = None, weights=None,
                      weights_2=None) -> torch.Tensor:
        """The condition of token ids ``(B, L)`` (``ids_2``: the second tokenizer's, SDXL; default ``ids``).
        ``weights``/``weights_2``: parameters of the text encoders overridden by name (``functional_call``;
        differentiable: textual inversion's new token vectors, ``attacks``)."""
        def run(encoder, x, w, **kw):
            return encoder(x, **kw) if not w else functional_call(encoder, w, (x,), kw, strict=False)
        if self.text_encoder_2 is None:
            return run(self.text_encoder, ids, weights).last_hidden_state.float()
        ids_2 = ids if ids_2 is None else ids_2
        h1 = run(self.text_encoder, ids, weights, output_hidden_states=True).hidden_states[-2]
        out2 = run(self.text_encoder_2, ids_2.to(self.device), weights_2, output_hidden_states=True)
        pooled = out2.text_embeds[:, None, :].expand(-1, ids.shape[1], -1)
        return torch.cat([h1.float(), out2.hidden_states[-2].float(), pooled.float()], dim=-1)

    def context(self, emb: torch.Tensor) -> torch.Tensor:
        """The rows ``attn2.to_k``/``to_v`` read, ``(..., L, d_ctx)``: ``emb`` itself, or SDXL's context without the
        pooled embedding."""
        return emb if emb.shape[-1] == self.context_dim else emb[..., :self.context_dim]

    def embed_context(self, prompts) -> torch.Tensor:
        """``context(embed(prompts))``: the rows ``to_k``/``to_v`` read, ``(B, L, d_ctx)`` (keys of the closed forms,
        rows of the null spaces)."""
        return self.context(self.embed(prompts))

    def empty_context(self) -> torch.Tensor:
        """``context(empty())``: ``c_0``'s rows as ``to_k``/``to_v`` read them, ``(1, L, d_ctx)``."""
        return self.context(self.empty())

    def with_context(self, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``emb`` with its context replaced by ``context`` (``(..., L, d_ctx)``): a condition made from changed rows
        (derived embeddings, projections onto a span) keeps the pooled embedding of ``emb`` (SDXL)."""
        if emb.shape[-1] == self.context_dim:
            return context
        return torch.cat([context.to(emb.dtype), emb[..., self.context_dim:].expand(*context.shape[:-1], -1)], -1)

    def empty(self) -> torch.Tensor:
        """``c_0``, the embedding of the empty prompt ``(1, L, d_in)`` (cached); zeros where the pipeline gives the
        empty prompt as zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        if self._empty is None:
            e = self.embed([""])
            self._empty = torch.zeros_like(e) if self.zero_empty else e
        return self._empty

    # ---------------------------------------------------------------------------------- image side
    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B,3,H,W)`` -> the UNet's input space (patchify, or VAE mean x scaling)."""
        images = images.to(self.device, torch.float32)
        if self.vae is not None:
            lat = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
            return lat.float() * self.vae.config.scaling_factor
        return F.pixel_unshuffle(images, self.patch)

    @torch.no_grad()
    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_latent`: images in [-1, 1]."""
        if self.vae is not None:
            lat = latents / self.vae.config.scaling_factor
            return self.vae.decode(lat.to(self.vae.dtype)).sample.float()
        return F.pixel_shuffle(latents, self.patch)

    @property
    def latent_shape(self) -> tuple:
        c = self.unet.config.in_channels
        s = self.unet.config.sample_size
        return (c, s, s)

    # ------------------------------------------------------------------------------- diffusion side
    def add_noise(self, z0, noise, t):
        """Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (notebook 01)."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def predict(self, z_t, t, emb, weights: dict | None = None) -> torch.Tensor:
        """Raw UNet output (in the model's own prediction type). ``weights`` overrides parameters by name
        (``torch.func.functional_call``): that is how an edited model ``theta + dtheta`` is run without
        copying the UNet."""
        t = t.expand(z_t.shape[0]) if t.dim() == 0 else t
        dt = self.unet.dtype
        z_t, emb = z_t.to(dt), emb.to(dt)
        kwargs = self.unet_inputs(emb)
        if weights:
            out = functional_call(self.unet, weights, (z_t, t), kwargs, strict=False).sample
        else:
            out = self.unet(z_t, t, **kwargs).sample
        return out.float()

    def unet_inputs(self, emb: torch.Tensor) -> dict:
        """The UNet's keyword inputs for conditions ``emb``: ``encoder_hidden_states`` (the context), and on SDXL
        ``added_cond_kwargs`` (the pooled embedding, the same on every row, and the size conditioning)."""
        kwargs = {"encoder_hidden_states": self.context(emb)}
        if self.time_ids is not None and emb.shape[-1] == self.context_dim:
            raise BadValue(f"this model (SDXL) takes conditions of width {self.context_dim} + the pooled embedding, "
                           f"as model.embed returns them; got a bare context of width {emb.shape[-1]} (give it the "
                           "prompt's pooled embedding with model.with_context(model.embed(prompts), context))")
        if self.time_ids is not None:
            kwargs["added_cond_kwargs"] = dict(text_embeds=emb[:, 0, self.context_dim:],
                                               time_ids=self.time_ids.to(emb.dtype).expand(len(emb), -1))
        return kwargs

    def to_eps(self, out, z_t, t):
        """Convert a raw output to eps: for v-prediction ``eps = sqrt(abar) v + sqrt(1-abar) x_t``."""
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * z_t
        if self.prediction_type == "sample":
            return (z_t - a.sqrt() * out) / (1 - a).sqrt()
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def eps(self, z_t, t, emb, weights: dict | None = None) -> torch.Tensor:
        """``eps_theta(x_t, c, t)``, always as noise, whatever the model predicts."""
        t = t.expand(z_t.shape[0]) if t.dim() == 0 else t
        return self.to_eps(self.predict(z_t, t, emb, weights), z_t, t)

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts, seeds=None, steps: int | None = None, guidance: float | None = None,
               weights: dict | None = None, batch_size: int | None = None, progress: bool = False,
               callback=None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance; returns images in [0, 1] ``(B,3,H,W)`` on the CPU.

        ``out = out(x, c0) + g * (out(x, c) - out(x, c0))`` (guidance is linear, so doing it on v or on
        eps is the same). The start noise of image ``k`` comes from ``seeds[k]`` alone, so the same seed
        gives the same image whatever the batch. ``weights``: parameters of an edited model.
        ``callback(i, t, z, x0_pred)`` is called after each DDIM step (notebook 01 shows the trajectory).
        ``embeddings``: precomputed conditions ``(B, L, d_in)`` used instead of encoding ``prompts`` (which may
        then be ``None``); the red-team probe of notebook 06 samples from derived embeddings this way.
        """
        if embeddings is not None and prompts is None:
            prompts = [""] * len(embeddings)
        prompts = prompt_list(prompts)
        if embeddings is not None and len(embeddings) != len(prompts):
            raise BadValue(f"got {len(embeddings)} embeddings but {len(prompts)} prompts; pass prompts=None "
                           "with embeddings")
        if not prompts:
            raise BadValue("no prompts to sample: pass a string or a non-empty list of prompts")
        side = self.latent_shape[-1] * (self.patch if self.vae is None else 8)
        config.check_memory(f"sampling {len(prompts)} images of {side} x {side}", len(prompts) * 12.0 * side * side,
                            "sample fewer prompts/seeds per call")
        if seeds is not None and (isinstance(seeds, (str, bytes, dict)) or not hasattr(seeds, "__iter__")):
            raise BadType(f"seeds must be a list of whole numbers (one per prompt), got {type(seeds).__name__}")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise BadValue(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        bad = [k for k in seeds if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < 2**63]
        if bad:
            raise BadValue(f"seeds must be whole numbers >= 0 (and below 2**63), got {bad[:3]}")
        steps = self.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.num_train_timesteps:
            raise BadValue(f"steps (DDIM steps) must be a whole number in 1..{self.num_train_timesteps} (the training "
                           f"schedule's length), got {steps!r}")
        g = self.guidance if guidance is None else guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or abs(g) > 1e3:
            raise BadValue(f"guidance must be a finite number of at most 1000 in size (the model's default is "
                           f"{self.guidance}), got {g!r}")
        batch_size = families.get(self.family).sample_batch() if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadValue(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if embeddings is not None and not torch.isfinite(embeddings).all():
            raise BadValue("the embeddings contain NaN or inf values")
        key = None if callback is not None else self._sample_key(prompts, seeds, steps, g, batch_size, weights, embeddings)
        hit = config.cache_load(key)
        if hit is not None:
            return hit
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        out = []
        chunks = range(0, len(prompts), batch_size)
        if progress:
            chunks = tqdm(chunks, desc="sampling")
        for s in chunks:
            ps, ss = prompts[s:s + batch_size], seeds[s:s + batch_size]
            z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(k)))
                             for k in ss]).to(self.device)
            z = z * sched.init_noise_sigma
            emb = self.embed(ps) if embeddings is None else embeddings[s:s + batch_size].to(self.device, torch.float32)
            e0 = self.empty().expand(len(ps), -1, -1)
            both = torch.cat([e0, emb])
            for i, t in enumerate(sched.timesteps):
                zz = sched.scale_model_input(torch.cat([z, z]), t)
                o = self.predict(zz, t.to(self.device).expand(2 * len(ps)), both, weights)
                o0, oc = o.chunk(2)
                res = sched.step(o0 + g * (oc - o0), t, z)
                z = res.prev_sample
                if callback is not None:
                    callback(int(i), int(t), z, res.pred_original_sample)
            if not torch.isfinite(z).all():
                raise FloatingPointError("sampling produced NaN/inf latents: the weights (or a delta or scale applied "
                                         "to them) are not finite; check the deltas with Delta.check_finite()")
            out.append(((self.from_latent(z) + 1) / 2).clamp(0, 1).cpu())
        out = torch.cat(out)
        config.cache_store(key, out)
        return out

    def _sample_key(self, prompts, seeds, steps, g, batch_size, weights, embeddings) -> str | None:
        """What the images of one ``sample`` call depend on, hashed (``config.sample_cache_dir``; None when off)."""
        if config.sample_cache_dir() is None:
            return None
        h = hashlib.sha256(repr((config.VERSION, torch.__version__, torch.get_num_threads(), str(self.device), prompts,
                                 [int(k) for k in seeds], int(steps), float(g), batch_size,
                                 dict(self.scheduler.config))).encode())
        parts = [self.unet.named_parameters(), self.text_encoder.named_parameters()]
        parts += [self.vae.named_parameters()] if self.vae is not None else []
        parts += [self.text_encoder_2.named_parameters()] if self.text_encoder_2 is not None else []
        parts += [sorted((weights or {}).items())] + ([[("embeddings", embeddings)]] if embeddings is not None else [])
        for named in parts:
            for n, t in named:
                h.update(n.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # --------------------------------------------------------------------------- cross-attention
    def cross_attention_layers(self) -> dict:
        """``{name: Attention}`` for every ``attn2`` (cross-attention) module of the UNet."""
        return {n: m for n, m in self.unet.named_modules() if n.endswith("attn2")}

    def kv_weight_names(self) -> list[str]:
        """Parameter names of ``to_k.weight`` and ``to_v.weight`` of every attn2: what SepME edits."""
        return [f"{n}.{p}.weight" for n in self.cross_attention_layers() for p in ("to_k", "to_v")]

    def cross_attention_param_names(self) -> list[str]:
        """All parameters of every attn2 (to_q, to_k, to_v, to_out): what G-CiRs fine-tunes."""
        names = set(self.cross_attention_layers())
        return [n for n, _ in self.unet.named_parameters() if n.rsplit(".", 2)[0] in names
                or any(n.startswith(m + ".") for m in names)]

    def params(self, names) -> dict:
        """``{name: parameter}`` of the UNet for ``names`` (a clear error for a name it does not have)."""
        d = dict(self.unet.named_parameters())
        missing = [n for n in names if n not in d]
        if missing:
            raise KeyError(f"this UNet has no parameters named {missing[:3]}; was it made for another architecture?")
        return {n: d[n] for n in names}

    def fingerprint(self) -> str:
        """A short hash of the base cross-attention weights; deltas remember it (and refuse other bases)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for n, p in self.params(self.kv_weight_names()).items():
                h.update(n.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def memory_report(self) -> str:
        """Parameter counts and memory of the parts, and the size of one SepME delta (GPU planning)."""
        def size(m):
            n = sum(p.numel() for p in m.parameters())
            b = sum(p.numel() * p.element_size() for p in m.parameters())
            return n, b
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        if self.vae is not None:
            parts["vae"] = self.vae
        lines = [f"{k}: {size(m)[0] / 1e6:.1f}M parameters, {size(m)[1] / 2**20:.0f} MiB" for k, m in parts.items()]
        kv = sum(p.numel() for p in self.params(self.kv_weight_names()).values())
        lines.append(f"one delta (all attn2 to_k/to_v, fp32): {kv * 4 / 2**20:.1f} MiB; Adam state for it: "
                     f"{3 * kv * 4 / 2**20:.1f} MiB")
        if self.device.type == "cuda":
            lines.append(f"CUDA memory allocated now: {torch.cuda.memory_allocated(self.device) / 2**30:.2f} GiB")
        return "\n".join(lines)

    @contextmanager
    def edited(self, weights: dict):
        """Temporarily write ``weights`` (name -> tensor) into the UNet; the originals come back bit-exact."""
        params = dict(self.unet.named_parameters())
        saved = {n: params[n].detach().clone() for n in weights}
        try:
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
            yield self
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
