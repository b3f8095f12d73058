# UperNet on Swin-B (window 7), ADE20K, 512x512, 160k iterations, batch 16, AdamW with layer-wise lr decay,
# for SimMIM's Swin-B.
# Official: there is no SimMIM Swin-B ADE20K config to follow (microsoft/SimMIM has no segmentation code or
#   config). The recipe is Swin's own:
#   SwinTransformer/Swin-Transformer-Semantic-Segmentation @87e6f90
#   `configs/swin/upernet_swin_base_patch4_window7_512x512_160k_ade20k.py` (= open-mmlab/mmsegmentation 1.x
#   `configs/swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py`):
#   AdamW lr 6e-5, betas (0.9, 0.999), wd 0.01, no wd on position tables and norms; warm-up 1500 iterations from
#   1e-6 x lr, then poly power 1.0 to 0; 160000 iterations; 2 images x 8 GPUs; drop path 0.3; UPerHead (512
#   channels) on the 4 stages + FCN auxiliary head on stage 3 (weight 0.4); whole-image test.
# Deviation (the MIM part): layer-wise lr decay 0.9 over the 24 blocks, the rate of SimMIM's Swin-B fine-tuning
#   after 100-epoch pre-training (microsoft/SimMIM @d3e29bc
#   `configs/swin_base__100ep/simmim_finetune__swin_base__img224_window7__100ep.yaml`, LAYER_DECAY 0.9; after
#   800 epochs it is 0.8: `optim_wrapper.paramwise_cfg.decay_rate=0.8`), with SimMIM's Swin layer ids
#   (`optimizer.py`, `get_swin_layer`), by our `LayerDecayOptimWrapperConstructor` (shared/transfer/mmseg_parts.py;
#   mmseg 1.4.2's decay constructor does not take Swin). This combination is ours and untuned.
# Weights: mmseg `SwinTransformer` names: `python -m shared.transfer.convert runs/simmim/<run>/last.pt --to mmseg`
#   (or mmseg's `tools/model_converters/swin2mmseg.py` on an official Swin). A SimMIM Swin-B pre-trained at
#   192 px with window 6 loads: mmseg resizes the relative position bias tables to window 7.
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
        type='SwinTransformer',
        pretrain_img_size=224,
        embed_dims=128,
        patch_size=4,
        window_size=7,
        mlp_ratio=4,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        strides=(4, 2, 2, 2),
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        qk_scale=None,
        patch_norm=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        use_abs_pos_embed=False,
        act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True)),
    decode_head=dict(
        type='UPerHead',
        in_channels=[128, 256, 512, 1024],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=512,
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
    test_cfg=dict(mode='whole'))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.9))

# 160k iterations, linear warm-up over 1500 from 1e-6 x lr, then linear decay to 0 (poly power 1.0);
# checkpoint and mIoU every 16000 (mmseg's schedule_160k).
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
default_hooks = dict(checkpoint=dict(interval=16000))
