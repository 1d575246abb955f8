"""Batches of structures and poses: one map each, padded to a few sizes, on any device; and batch
jobs (`modelmap batch`): many model maps from a manifest, in this process or on Ray, resumable."""

from ._batch import (
    assemble as assemble,
    BatchGroup as BatchGroup,
    BatchMaps as BatchMaps,
    bucket_size as bucket_size,
    member_count as member_count,
    default_batch_size as default_batch_size,
    pad_atoms as pad_atoms,
    plan_batch as plan_batch,
    render_batch as render_batch,
    render_poses as render_poses,
    render_stacked as render_stacked,
    stack_volumes as stack_volumes,
)
from ._jobs import (
    EntryResult as EntryResult,
    JobReport as JobReport,
    JobWorker as JobWorker,
    run_job as run_job,
    ZarrStore as ZarrStore,
)
from ._manifest import (
    JobDefaults as JobDefaults,
    JobEntry as JobEntry,
    ManifestError as ManifestError,
    read_manifest as read_manifest,
)
