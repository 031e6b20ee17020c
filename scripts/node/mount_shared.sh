#!/usr/bin/env bash
# Mount the storage every node shares (Ray's state, checkpoints, MLflow's artifacts, the model cache) at the same
# path on every node; cluster.yaml's setup_commands run it on every node, on every `ray up`.
#
#   scripts/node/mount_shared.sh SOURCE MOUNTPOINT
#
# SOURCE is an NFS export (EFS: fs-....efs.REGION.amazonaws.com:/), or `none` where MOUNTPOINT is already the same
# storage on every node (an image that mounts it, or scripts/cluster_rehearsal.py's single machine).
# An EFS mount target's security group must allow inbound NFS (TCP 2049) from the nodes' security group, or the
# mount hangs.
set -euo pipefail
source=$1
mnt=$2
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo

$sudo mkdir -p "$mnt"
if [ "$source" != none ] && ! mountpoint -q "$mnt"; then
  $sudo mount -t nfs4 -o nfsvers=4.1 "$source" "$mnt"
fi
# the SSH user runs Ray and MLflow, which write there
$sudo chown "$(id -u):$(id -g)" "$mnt"
