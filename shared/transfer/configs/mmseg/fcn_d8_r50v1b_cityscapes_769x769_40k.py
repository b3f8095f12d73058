# DenseCL's Cityscapes protocol (Wang et al., CVPR 2021, semantic segmentation transfer): FCN-D8, ResNet-50
# V1b, 769x769 crops, 40k iterations, batch 8.
# Official: WXinlong/mmsegmentation @32b0affd `configs/densecl/fcn_r50-d8_769x769_40k_cityscapes.py`
#   = `configs/densecl/fcn_r50-d8.py` + `_base_/datasets/cityscapes_769x769.py` + `_base_/default_runtime.py`
#   + `_base_/schedules/schedule_40k.py` (mmseg 0.11);
#   mmseg 1.x: `configs/fcn/fcn_r50-d8_4xb2-40k_cityscapes-769x769.py`.
# Every number is the fork's: 19 classes; align_corners=True in both heads; SGD lr 0.01, momentum 0.9, wd 5e-4;
# poly power 0.9, min lr 1e-4; 40000 iterations; checkpoint and mIoU every 4000; 2 images per GPU; resize
# (2049, 1025) x [0.5, 2.0], crop 769 (cat_max_ratio 0.75), flip 0.5, photometric distortion; test at
# (2049, 1025), sliding 769x769 windows with stride 513.
# Total batch 8 = 4 GPUs x 2 (DenseCL's `benchmarks/detection/README.md` runs this config with GPUS=4).
# Deviations: none in the numbers; weight loading as in the VOC config.
_base_ = ['./_runtime.py', './_fcn_d8_r50v1b.py']

dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
crop_size = (769, 769)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(align_corners=True),
    auxiliary_head=dict(align_corners=True),
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2049, 1025), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2049, 1025), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
auto_scale_lr = dict(enable=False, base_batch_size=8)
