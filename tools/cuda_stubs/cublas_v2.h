// Syntax-check stub (tools/check_cuda.sh only): the CPU torch wheel ships ATen/cuda headers
// without the CUDA libraries' headers they include. Never used for a real build.
#pragma once
#include <cuda_runtime.h>
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS=0 } cublasStatus_t;
