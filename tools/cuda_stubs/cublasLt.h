// Syntax-check stub (tools/check_cuda.sh only): the CPU torch wheel ships ATen/cuda headers
// without the CUDA libraries' headers they include. Never used for a real build.
#pragma once
typedef struct cublasLtContext* cublasLtHandle_t;
