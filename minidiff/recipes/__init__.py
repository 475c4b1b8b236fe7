"""Recipes: whole trainings built on minidiff.train (its one train_step, optimizer, schedule and state helpers).

  tiny.py         the embedded shapes model from scratch: data -> VAE -> CLIP -> latents -> U-Net -> save + evaluate
                  (`minidiff train-tiny`)
  model_card.py   the tiny model's MODEL_CARD.md, written from the run's report
"""
