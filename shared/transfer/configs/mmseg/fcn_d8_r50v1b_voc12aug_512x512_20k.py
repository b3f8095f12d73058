# DenseCL's PASCAL VOC protocol (Wang et al., CVPR 2021, semantic segmentation transfer): FCN-D8, ResNet-50
# V1b, VOC 2012 train + SBD aug, 512x512 crops, 20k iterations, batch 16.
# Official: WXinlong/mmsegmentation @32b0affd `configs/densecl/fcn_r50-d8_512x512_20k_voc12aug.py`
#   = `configs/densecl/fcn_r50-d8.py` + `_base_/datasets/pascal_voc12_aug.py` + `_base_/default_runtime.py`
#   + `_base_/schedules/schedule_20k.py` (mmseg 0.11), translated to mmseg 1.x as mmseg itself did in
#   open-mmlab/mmsegmentation `configs/fcn/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py`.
# Every number is the fork's: SGD lr 0.01, momentum 0.9, wd 5e-4; poly power 0.9, min lr 1e-4, per iteration;
# 20000 iterations; checkpoint and mIoU every 2000; 4 images per GPU; resize (2048, 512) x [0.5, 2.0], crop 512
# (cat_max_ratio 0.75), flip 0.5, photometric distortion, pad 0 / seg 255; single-scale test at (2048, 512).
# Total batch 16 = 4 GPUs x 4 (`auto_scale_lr.base_batch_size`; the fork states no GPU count for VOC, mmseg
# names the recipe 4xb4, and the example in DenseCL's README, on Cityscapes, uses GPUS=4).
# Deviations: none in the numbers. The fork loaded `torch.load(path)["state_dict"]` with strict=False into its
# `ResNetNormal`; here mmengine's `Pretrained` init loads the same file into `ResNet` and
# `shared.transfer.segmentation` stops if any backbone key is missing or unexpected.
_base_ = ['./_runtime.py', './_fcn_d8_r50v1b.py']

dataset_type = 'PascalVOCDataset'
data_root = 'data/VOCdevkit/VOC2012'
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=21),
    auxiliary_head=dict(num_classes=21))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
voc_train = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    ann_file='ImageSets/Segmentation/train.txt',
    pipeline=train_pipeline)
sbd_aug = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    ann_file='ImageSets/Segmentation/aug.txt',
    pipeline=train_pipeline)
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[voc_train, sbd_aug]))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=20000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=2000)
default_hooks = dict(checkpoint=dict(interval=2000))
auto_scale_lr = dict(enable=False, base_batch_size=16)
