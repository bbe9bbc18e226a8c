// Syntax-check stub (tools/check_cuda.sh only): the CPU torch wheel ships ATen/cuda headers
// without the CUDA libraries' headers they include. Never used for a real build.
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS=0 } cusparseStatus_t;
