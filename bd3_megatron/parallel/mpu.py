"""DeepSpeed's view of megatron-core's process groups.

DeepSpeed asks an ``mpu`` object for its model-parallel group (which ranks hold *different* parts of one model
replica: megatron's TP×PP group, so grad norms are summed over all of them) and for its data-parallel group (the
ranks among which ZeRO shards optimizer state and averages gradients). Tensor-parallel calls let DeepSpeed skip
double counting of replicated parameters.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    # model parallel = every rank of one replica (TP x PP)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_rank() -> int:
        return (
            ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
            + ps.get_tensor_model_parallel_rank()
        )

    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipe_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipe_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
