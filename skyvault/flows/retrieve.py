"""The retrieve flow: an archived dataset's datablocks from LTS to the retrieval prefix, with links.

Each datablock already in ``<retrieval-prefix>/<dataset-id>/`` with the manifest's size and sha256
is reused; the others are read from LTS, verified against the manifest and uploaded. The user gets
presigned URLs and a download script that fetches and checks every block. Retrievals of one
dataset run one at a time (a ``flock`` on LTS), so a second request, from any process, waits for
the first and then reuses its copies.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.futures import wait

from skyvault.archive.lts import dataset_dir, dataset_lock
from skyvault.config.settings import get_settings
from skyvault.errors import MissingFilesError
from skyvault.flows.archive import artifact_key
from skyvault.ids import check_id
from skyvault.models import RetrieveResult
from skyvault.tasks.archive import (
    publish_retrieval,
    read_manifest,
    retrieved_copy_ok,
    upload_datablock,
    verify_datablock,
)


def _summary(result: RetrieveResult) -> str:
    rows = "\n".join(
        f"| [{b.name}]({b.url}) | {b.size} | `{b.sha256}` | {'copied from LTS' if b.copied else 'reused'} |"
        for b in result.datablocks
    )
    return (
        f"# Retrieval of dataset `{result.dataset_id}`\n\n"
        f"{len(result.datablocks)} datablock(s) in `{result.prefix}` ({result.copied} copied from LTS). "
        f"Links expire at {result.expires_at.isoformat()}.\n\n"
        f"Download and check everything with [the download script]({result.script_url}): "
        "`bash download.sh [folder]`.\n\n"
        f"| datablock | bytes | sha256 | |\n|---|---:|---|---|\n{rows}\n"
    )


@flow(name="retrieve", flow_run_name="retrieve/{dataset_id}")
def retrieve(dataset_id: str) -> RetrieveResult:
    """Bring an archived dataset's datablocks back to the retrieval prefix and hand out links.

    Raises:
        InvalidIdentifierError: the dataset id is unsafe (checked before any I/O).
        MissingFilesError: the dataset has no manifest on LTS (it is not archived).
        VerificationError: a datablock on LTS does not match the manifest.

    """
    check_id(dataset_id, "dataset id")
    settings = get_settings()
    lts, store = settings.lts, settings.store
    with dataset_lock(lts, "retrieve", dataset_id, timeout_seconds=settings.locks.wait_seconds):
        manifest = read_manifest(lts, dataset_id)
        if manifest is None:
            raise MissingFilesError(
                f"dataset {dataset_id!r} is not archived: no manifest in {dataset_dir(lts, dataset_id)}"
            )
        present = [retrieved_copy_ok.submit(lts, store, dataset_id, b) for b in manifest.datablocks]
        found = [f.result() for f in present]
        todo = [b for b, ok in zip(manifest.datablocks, found, strict=True) if not ok]
        verified = [verify_datablock.submit(lts, dataset_id, b) for b in todo]
        uploads = [upload_datablock.submit(lts, store, dataset_id, v, return_state=False) for v in verified]
        wait(verified)
        wait(uploads)
        for v in verified:
            v.result()
        for u in uploads:
            u.result()
        result = publish_retrieval(lts, store, manifest, {b.name for b in todo})
    for block in result.datablocks:
        create_link_artifact(
            key=artifact_key("retrieval", dataset_id, block.name),
            link=block.url,
            link_text=block.name,
            description=f"datablock {block.name} of dataset {dataset_id}, sha256 {block.sha256}",
        )
    create_link_artifact(
        key=artifact_key("retrieval", dataset_id, "download-script"),
        link=result.script_url,
        link_text="download.sh",
        description=f"download script for dataset {dataset_id}",
    )
    create_markdown_artifact(
        key=artifact_key("retrieval", dataset_id), markdown=_summary(result), description="retrieval summary"
    )
    return result
