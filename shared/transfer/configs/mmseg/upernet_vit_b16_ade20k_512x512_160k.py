# UperNet on ViT-B/16, ADE20K, 512x512, 160k iterations, batch 16, AdamW with layer-wise lr decay: the
# masked-image-modelling transfer protocol (BEiT's semantic segmentation code, used by MAE; MAE's paper
# reports MoCo v3 ViT-B under it).
# Official: open-mmlab/mmsegmentation 1.x `configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`
#   (+ `_base_/models/upernet_mae.py`, `_base_/datasets/ade20k.py`, `_base_/schedules/schedule_160k.py`),
#   mmseg's reproduction of MAE ViT-B; its optimisation is BEiT's `microsoft/unilm`
#   `beit/semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k_pt.py`
#   except the lr (BEiT, self-supervised ImageNet weights: 7e-4).
# Numbers kept: AdamW lr 1e-4, betas (0.9, 0.999), wd 0.05, layer decay 0.65 over 12 blocks; warm-up 1500
# iterations, then poly power 1.0 to 0; 160000 iterations; 2 images x 8 GPUs; drop path 0.1; LN eps 1e-6;
# features of blocks (3, 5, 7, 11) -> Feature2Pyramid (x4, x2, x1, x0.5) -> UPerHead (768 channels, pool
# scales 1, 2, 3, 6) + FCN auxiliary head on the third level (256 channels, weight 0.4); test by 512x512
# sliding windows, stride 341.
# Deviations:
# - Backbone: mmseg's `VisionTransformer` (timm / MoCo v3 layout, which `shared.transfer.convert` writes):
#   absolute position embeddings (resized bicubically to 32x32), no layer scale and no relative position bias
#   (mmseg's `MAE`/`BEiT` backbones have both and other key names). `patch_bias=True` because a timm patch
#   embedding has a bias (mmseg's default drops it), `final_norm=True` so the pretrained final LayerNorm is used
#   (on block 11's output) and every pretrained tensor has a place.
# - Layer decay by our `LayerDecayOptimWrapperConstructor` (shared/transfer/mmseg_parts.py): mmseg 1.4.2's
#   `LearningRateDecayOptimizerConstructor` only takes BEiT/MAE/ConvNeXt backbones. Same layer ids and scales.
# - fp32 `OptimWrapper`: BEiT trained with fp16; mmseg's 1.x config runs fp32 unless `tools/train.py --amp`.
#   For mixed precision on GPUs: `optim_wrapper.type=AmpOptimWrapper`.
_base_ = ['./_runtime.py', './_ade20k_512x512.py']
custom_imports = dict(imports=['shared.transfer.mmseg_parts'], allow_failed_imports=False)

crop_size = (512, 512)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=crop_size),
    backbone=dict(
        type='VisionTransformer',
        img_size=crop_size,
        patch_size=16,
        in_channels=3,
        embed_dims=768,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4,
        qkv_bias=True,
        patch_bias=True,
        with_cls_token=True,
        output_cls_token=False,
        final_norm=True,
        out_indices=(3, 5, 7, 11),
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_cfg=dict(type='LN', eps=1e-6),
        act_cfg=dict(type='GELU'),
        interpolate_mode='bicubic',
        norm_eval=False),
    neck=dict(type='Feature2Pyramid', embed_dim=768, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.65))

# 160k iterations, linear warm-up over 1500 from 1e-6 x lr, then linear decay to 0 (poly power 1.0);
# checkpoint and mIoU every 16000 (mmseg's schedule_160k).
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
default_hooks = dict(checkpoint=dict(interval=16000))
