"""AnyDressing for the AUTOMATIC1111 / Forge WebUIs, importable and testable without them.

The map, by layer (a package imports only from packages of lower layers, never from a sibling of its
own layer or from above; tests/test_layout.py checks it):

0. `garments`    the garment categories, one vocabulary.
1. `files`       shared I/O: images, weight files (safetensors, `.pth` with weights_only), TOML configs,
                 the dressing-dataset manifest, transformers models read without unpickling, bench output.
2. `sd`          SD1.x/SDXL plumbing: architectures, single-file checkpoints as real modules, the CLIP tokenizer,
                 DDIM sampling, diffusion targets, SDPA attention, training patches, random models for
                 tests and benches, the diffusers <-> ldm UNet key map, forward patches that come off exactly.
3. `engine`      the method: GarmentsNet, Dressing-Attention, regions, the model format (docs/method.md).
   `segment`     cutting garments out of photos (SAM, GrabCut, mask tools).
   `training`    the training loop both trainers share (Lightning Fabric), and its resume format.
4. `generation`  one dressed generation (options, garment preparation, guidance, infotext), model folders.
   `anydressing_trainer`  training AnyDressing models (losses, DISTS, dataset builder, `train`).
   `garment_lora`         garment LoRAs (dataset import, captions, kohya-format LoRA, `train-lora`).
   `evaluation`  the paper's metrics.  `convert`  peers' weights into the AnyDressing format.
5. `tabs`        the AnyDressing tabs (Segment garment, Train garment LoRA) as gradio Blocks.
   `cli`         demo, bench and selftest commands (`python -m lib_anydressing`).
   `batch`       catalog dressing from a manifest, in one process or on Ray (`dress-batch`, `bench-batch`).
6. `webui`       the only package that imports the WebUI (`modules.*`, Forge's `backend.*`): the
                 txt2img/img2img accordion, X/Y/Z, the Forge patcher, the model loan to training.
"""
