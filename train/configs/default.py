"""The built-in default: a small Stable Diffusion trained from nothing on `shapes` (clip -> vae -> unet).

Sized to finish in about 20 minutes on a 2-core CPU; on an accelerator raise the steps and widths.
Run: python -m train --workdir DIR [--config train/configs/default.py] [--config.unet.steps=4000]
"""

import ml_collections


def _optimizer(lr, warmup, schedule="cosine", weight_decay=1e-2):
  # total_steps 0: the stage's own steps, so the cosine decay follows --config.<stage>.steps.
  return ml_collections.ConfigDict(
      dict(lr=lr, warmup_steps=warmup, schedule=schedule, total_steps=0, end_lr_ratio=0.1, weight_decay=weight_decay,
           b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, grad_accum_steps=1, mu_dtype="float32"))


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "clip,vae,unet"  # run in this order; a finished stage is skipped on rerun
  c.init = ""  # a diffusers Stable Diffusion folder: fine-tune its U-Net (VAE and text encoder frozen)
  c.dtype = "float32"  # computation dtype ("bfloat16" on TPU/GPU); parameters stay fp32
  c.log_every = 50
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.progress = True
  c.benchmark_steps = 0  # > 0: compile, time this many U-Net steps, print one JSON line, stop

  # data: -1 for the devices not used by fsdp; devices: -1 for every device, N for the first N (one process only)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, devices=-1))

  c.data = ml_collections.ConfigDict(
      dict(
          name="shapes/32x32",  # any prepared TFDS dataset, e.g. one made by jaxsd.data.prepare_image_folder
          data_dir="",  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
          image_key="image",
          caption_key="caption",
          mask_key="",  # the feature marking each image's subject; "": the built-in dataset's own (shapes: mask)
          image_size=32,
          random_flip=False,  # flip half of the training images horizontally
          # ... and swap "left" / "right" in their captions; None: for the built-in datasets only (their captions
          # describe the picture), a caption of one's own stays as written (as diffusers' --random_flip)
          flip_swaps_left_right=ml_collections.FieldReference(None, field_type=bool),
          random_crop=False,  # training crops at a random place (SDXL records where), else at the centre
          num_threads=2,
          train_split="train",
          test_split="test",
      ))

  # Stage 1: contrastive CLIP, the text encoder of the later stages and the judge of the samples.
  c.clip = ml_collections.ConfigDict(
      dict(
          steps=600,
          batch_size=64,  # 150 steps left shape and position out of the text encoder (docs/training.md)
          # 5e-4: caption retrieval 0.72-0.74 at seeds 0-3; at 1e-3 it was 0.71 / 0.38 / 0.56 at seeds 0 / 2 / 3, and
          # seed 2's U-Net then drew position at chance (docs/training.md, thirteenth round).
          optimizer=_optimizer(5e-4, 60),
          text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=32, hidden_act="quick_gelu"),  # shapes captions are < 20 tokens
          vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                      patch_size=8, hidden_act="quick_gelu"),
          projection_dim=128,
          eval_examples=1000,  # zero-shot caption retrieval on the test split, in groups of 100
      ))

  # Stage 2: the KL autoencoder; 32x32x3 images -> 16x16x4 latents.
  c.vae = ml_collections.ConfigDict(
      dict(
          # The same 12,800 images as 32 x 400 in 1.1x the CPU time, and far sharper (PSNR 31.0 vs 26.8 dB; the
          # judge's shape on its reconstructions 0.90 vs 0.80): the number of updates counts (docs/training.md).
          steps=1600,
          batch_size=8,
          optimizer=_optimizer(1e-3, 160),
          block_out_channels=(16, 32),
          layers_per_block=1,
          latent_channels=4,
          norm_num_groups=8,
          kl_weight=1e-6,
          l1_weight=1.0,
          l2_weight=1.0,
          edge_weight=0.0,  # L1 on neighbouring-pixel differences (losses.vae_loss)
          # Each pixel's error weighs 1 + this x the dataset's mask (data.mask_key; "" = shapes' own "mask"), the mask
          # grown by `foreground_dilation` pixels first, normalised per image: a small shape is 5% of the pixels, and
          # unweighted the VAE rounded small squares' corners (its reconstructions judged square 0.65-0.79) and the
          # U-Net drew small circles and squares as one blob. Weight 10, dilation 1: reconstructions of small
          # squares 0.91-1.00, the samples' shape 0.92 against 0.78 at seed 2 (docs/training.md, sixteenth round).
          # A dataset without a mask: name one with data.mask_key, or set 0.
          foreground_loss_weight=10.0,
          foreground_dilation=1,
          eval_examples=1000,
      ))

  # Stage 3: latent diffusion with the frozen VAE and CLIP text encoder.
  c.unet = ml_collections.ConfigDict(
      dict(
          # Batch 16 x 1,200 steps beat 32 x 600 (the same images, the same CPU time) on every judged figure, and
          # 2,000 steps beat 1,200 (shape 0.79 vs 0.70 on the sharper VAE; docs/training.md): far from
          # convergence, the number of updates is what counts. 4,500 (with the unweighted VAE at seed 0: shape
          # 0.867, all four 0.861, shapes-FID 2.59x; 1,500 gave 0.806 / 0.706 / 3.96x; with the weighted VAE 0.922 /
          # 0.911 / 2.77x) fit the 20 minutes on the 2-core VMs of 2026-12-04/05 (U-Net step 0.14-0.15 s), not on
          # the 1.6-2x slower ones (an Intel Xeon VM: 28 min 41 s; docs/training.md, fourteenth, sixteenth and
          # eighteenth rounds); on an accelerator raise it.
          steps=4500,
          batch_size=16,
          optimizer=_optimizer(1e-3, 450),
          block_out_channels=(32, 64, 128),
          layers_per_block=1,
          attention_head_dim=4,
          norm_num_groups=32,
          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
          # "text": diffusers' addition embedding, the attention-pooled prompt added to the time embedding, so
          # every ResNet block sees it (not only the cross-attention levels); "" for none (SD 1.x / 2.x).
          # Still a diffusers UNet2DConditionModel: StableDiffusionPipeline loads the exported model as is.
          addition_embed_type="text",
          addition_embed_type_num_heads=8,
          # How each ResNet block takes the time (+ pooled prompt) embedding, diffusers' names: "default" adds it
          # before norm2; "scale_shift" (ADM's AdaGN, Dhariwal & Nichol 2021) scales and shifts norm2's output.
          resnet_time_scale_shift="default",
          # v-prediction: an epsilon-predicting U-Net's clean-image estimate at high noise is its error times
          # sigma (~15 at t=999), and shape, colour and place are decided there; with v the estimate is well
          # conditioned at every noise level (Salimans & Ho 2022). Colour 0.64 vs 0.39 at step 300.
          prediction_type="v_prediction",  # or "epsilon"
          # Min-SNR-gamma weighting (Hang et al. 2023) off: for v its weight min(SNR, 5) / (SNR + 1) is ~SNR at
          # high noise (0.005 at t=999), where the layout is decided, and the U-Net did not learn to place
          # shapes (position 0.32 with it, 0.96 without; docs/training.md, fourth round).
          min_snr_gamma=0.0,  # > 0 enables it
          # Zero terminal SNR (Lin et al. 2024): the last timestep is pure noise, as sampling starts; needs
          # v-prediction. The exported scheduler then says rescale_betas_zero_snr and "trailing" spacing.
          rescale_betas_zero_snr=False,
          # The betas, as diffusers names them: "scaled_linear" (SD's), "squaredcos_cap_v2" (the cosine schedule
          # of Nichol & Dhariwal 2021, less noise at every middle timestep and pure noise at the last), "linear".
          beta_schedule="scaled_linear",
          # Where the timesteps fall: "logit_normal", t/T = sigmoid(N(mean, std^2)) (SD3; diffusers' --logit_mean /
          # --logit_std), here with the location 0.8: the noisy end, where position is decided, keeps more than
          # uniform's share (P(t > 750) 0.36) and the near-clean draws (t < 250: 3% against 25%) go to the middle,
          # where shape is decided. Shape 0.81 against uniform's 0.70 / 0.71, all-correct 0.77 against 0.66 / 0.68,
          # shapes-FID 446 against 357 / 369 (docs/training.md, eighth round). "uniform": independent draws
          # (diffusers' default); "stratified": one per equal stratum of [0, 1000) (Kingma et al. 2021).
          timestep_sampling="logit_normal",
          timestep_logit_mean=0.8,
          timestep_logit_std=1.0,
          # A fifth of the timesteps drawn uniformly instead (a mixture): the near-clean end (t < 250, 3% of the
          # logit-normal draws, 7% of the mixture's), where backgrounds and edges are finished, is trained again.
          # Over seeds 0-2: shapes-FID -16 / -17 / -21%, all-correct +0.04 / +0.05 / +0.03, shape +0.08 / +0.04 /
          # +0.01 (docs/training.md, thirteenth round). 0: the logit-normal draw alone.
          timestep_uniform_fraction=0.2,
          caption_dropout=0.1,  # captions replaced by "" so classifier-free guidance works
          # diffusers' train_text_to_image options (losses.diffusion_loss): `noise_offset` 0.1 or so lets a model
          # draw very dark or bright images; `input_perturbation` 0.1 (Ning et al. 2023) trains against the
          # sampler's exposure bias.
          noise_offset=0.0,
          input_perturbation=0.0,
          # > 0: each latent pixel's loss weighs 1 + this x the share of its pixels the dataset's mask covers
          # (data.mask_key, or the dataset's own: shapes' "mask" is the shape). 4 left shape where it was over
          # three seeds (fifteenth round in docs/training.md), so the default is unweighted.
          foreground_loss_weight=0.0,
          # Train the text encoder with the U-Net on the diffusion loss (as LDM did). CLIP's contrastive text
          # tower keeps colour and size apart but hardly shape and position (0.03 relative difference in its
          # hidden states); but joint training at the U-Net's learning rate lost colour too (docs/training.md).
          train_text_encoder=False,
          text_encoder_lr=0.0,  # with train_text_encoder: its peak learning rate (kohya's, diffusers'); 0: the U-Net's
          # Encode the training split once with the frozen VAE and text encoder (posterior moments and hidden
          # states, in DIR/unet/latent_cache) and train on that: a step then runs the U-Net alone. Pays off
          # from about two epochs (docs/training.md); images are not flipped with it.
          cache_latents=False,
          ema_decay=0.999,
          gradient_checkpointing=False,
          sample_every=1500,  # sample grid (and judged evaluation) every N steps (0: only at the end)
          sample_prompts=(),  # its prompts; () = the dataset's own (jaxsd/data/builtin.py), or four generic ones
          sampler="dpmpp_2m",
          sample_steps=10,
          # Judged on the default model: guidance 2 gave the same shape as 3 (0.79) and shapes-FID 361 against 634
          # (sixth round); on two draws of today's default 1.75 beats 2 on both figures (seed 0: shape 0.900 both,
          # FID 2.70x against 3.04x; seed 1: shape 0.872 against 0.856, FID 1.99x against 2.09x), 1.5 and 1.25 cost
          # shape on seed 0, 1.0 costs everything (docs/training.md, eighteenth round); 20 sampling steps were no
          # better than 10 (both rounds). Only what the samples are judged with; the exported model is unchanged.
          guidance_scale=1.75,
      ))

  # Judging the samples (shapes only): an independent classifier trained on the dataset's labels scores
  # every canonical prompt per attribute, and its features give a shapes-FID; at every sample point
  # of the U-Net stage and in the final report.
  c.eval = ml_collections.ConfigDict(
      dict(
          judge=True,
          judge_steps=1000,
          judge_train_examples=20000,
          images_per_prompt=1,  # x 180 canonical prompts (colour x shape x size x position)
          fid_images=1000,  # samples of test captions, against as many other real test images
          periodic_fid_images=100,  # the same, during training (a trend; sampling 1,000 images costs minutes on a CPU)
      ))
  return c
