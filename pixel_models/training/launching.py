"""How processes are started: a multirun with plain ``ddp`` would re-run the whole sweep in every process."""

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def refuse_relaunching_ddp(trainer: L.Trainer, multirun: bool) -> None:
    """Plain ``ddp`` starts its other processes by re-running the command line: in a multirun that would be
    the whole sweep again, once per process. Refused unless a cluster (SLURM, torchrun) started them."""
    launcher = trainer.strategy.launcher
    if not (multirun and isinstance(launcher, _SubprocessScriptLauncher)):
        return
    if launcher.cluster_environment.creates_processes_externally:
        return
    if launcher.num_processes * launcher.num_nodes <= 1:
        return
    raise RuntimeError(
        "trainer.strategy=ddp starts its other processes by re-running this command, which in a multirun "
        "(-m) would re-run the whole sweep in every process. For a sweep, either submit it to SLURM, where "
        "SLURM starts one process per GPU (-m hydra/launcher=submitit_slurm trainer=ddp "
        "hydra.launcher.gpus_per_node=<N>), or start the processes by spawning: trainer.strategy=ddp_spawn."
    )
