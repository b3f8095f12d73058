# FCN-D8 on ResNet-50 V1b, the model of DenseCL's segmentation protocol: WXinlong/mmsegmentation
# @32b0affd `configs/densecl/fcn_r50-d8.py` (mmseg 0.11). Its backbone `ResNetNormal` is
# `ResNet(deep_stem=False, avg_down=False)`, i.e. mmseg's plain `ResNet` (7x7 stem, torchvision names),
# not the `ResNetV1c` (3x3 deep stem) of mmseg's `configs/_base_/models/fcn_r50-d8.py`.
# 1.x form: the data preprocessor replaces the 0.x Normalize/Pad transforms with the same numbers.
# The backbone has no init_cfg here: `--weights` sets `Pretrained` (the fork set `model.pretrained`).
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True),
    decode_head=dict(
        type='FCNHead',
        in_channels=2048,
        in_index=3,
        channels=512,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
