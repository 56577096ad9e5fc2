"""The full-size CogVideoX-5B and CogVideoX1.5-5B configurations (DESIGN.md), for planning and benchmarks without a download."""

from __future__ import annotations

# The inversion and edit schedulers are both built from this.
SCHEDULER_5B = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    snr_shift_scale=1.0,
)

TRANSFORMER_5B = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=42,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    max_text_seq_length=226,
    use_rotary_positional_embeddings=True,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    attention_bias=True,
    norm_eps=1e-5,
)

T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
)

VAE_5B = dict(scaling_factor=0.7)  # diffusers' AutoencoderKLCogVideoX defaults otherwise

# Parameters of the configs above, as counted on the meta device (tests/test_plans.py recounts
# them): `cogedit plan` needs them, and building the models to count them takes diffusers' import.
PARAMS_5B = dict(transformer=5_570_283_072, text_encoder=4_762_310_656, vae=215_583_907)

# CogVideoX1.5-5B's transformer as diffusers' release of it configures it (the config.json of
# THUDM/CogVideoX1.5-5B/transformer, also in diffusers' scripts/convert_cogvideox_to_diffusers.py
# for version 1.5): the 5B's blocks, with time patched by 2, no patch-embedding bias, and a rotary
# grid of up to 300x300 latent cells ("slice" grid, engine.models.denoiser). Its text length in
# that config is 226 tokens, as for 5B. Its VAE, T5 and scheduler are 5B's.
TRANSFORMER_15 = dict(
    TRANSFORMER_5B,
    patch_size_t=2,
    patch_bias=False,
    sample_height=300,
    sample_width=300,
    sample_frames=81,
    temporal_compression_ratio=4,
    use_learned_positional_embeddings=False,
)
PARAMS_15 = dict(PARAMS_5B, transformer=5_570_676_352)
