# Runtime shared by our mmseg configs: mmseg 1.x's `configs/_base_/default_runtime.py` and the hooks of its
# `configs/_base_/schedules/schedule_*.py` (open-mmlab/mmsegmentation 1.x), written out here so that the
# configs need no mmseg config tree. Deviation: a fixed seed (mmseg leaves it random).
# `python -m shared.transfer.segmentation` sets work_dir, the launcher, the weights and, without
# CUDA, SyncBN -> BN and the gloo backend.
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
tta_model = dict(type='SegTTAModel')

val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
