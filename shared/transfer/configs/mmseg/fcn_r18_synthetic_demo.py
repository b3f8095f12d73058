# CPU demo of the segmentation transfer: DenseCL's FCN-D8 protocol (fcn_d8_r50v1b_voc12aug_512x512_20k.py)
# shrunk to run in minutes on 2 CPU cores, on the built-in synthetic dataset's VOC export in the pretraining
# demos' easy setting, as `shared/transfer/demo.py` writes it (`python -m shared.data.synthetic --format voc
# --out DIR --image-size 64 --texture 0 --palette 1 --rotation 0`): 9 classes (background + 8 shapes). With the
# default textured backgrounds 300 iterations learn nothing beyond background, from either init.
# Not an official protocol. Kept from it: FCN-D8 (dilations 1, 1, 2, 4; strides 1, 2, 1, 1; contract_dilation),
# a V1b ResNet (7x7 stem, torchvision names, so our converted ResNet-18 loads), FCN head with input concat and
# dropout 0.1, auxiliary FCN head on stage 3 (weight 0.4), SGD momentum 0.9 wd 5e-4, poly 0.9 to 1e-4, the
# augmentations (random resize, crop with cat_max_ratio 0.75, flip, photometric distortion), mIoU at the end.
# Changed for speed: ResNet-18 (heads 512 -> 128 and 256 -> 64 channels), plain BN (one process), 64x64 crops
# from 64x64 images resized by [0.75, 1.5], batch 8, 300 iterations, lr 0.02, one data worker.
_base_ = ['./_runtime.py']
custom_imports = dict(imports=['shared.transfer.mmseg_parts'], allow_failed_imports=False)

dataset_type = 'SyntheticShapesDataset'
data_root = 'data/synthetic-voc'
crop_size = (64, 64)
norm_cfg = dict(type='BN', requires_grad=True)
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
        type='ResNet',
        depth=18,
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
        in_channels=512,
        in_index=3,
        channels=128,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=9,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=256,
        in_index=2,
        channels=64,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=9,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
data_prefix = dict(img_path='JPEGImages', seg_map_path='SegmentationClass')
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix=data_prefix,
                 ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix=data_prefix,
                 ann_file='ImageSets/Segmentation/val.txt', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=300, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=300)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=100, max_keep_ckpts=1),
    visualization=dict(type='SegVisualizationHook', draw=False))
auto_scale_lr = dict(enable=False, base_batch_size=8)
