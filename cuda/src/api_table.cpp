// api_table.cpp -- the C entries as one table (escoin_api_t), for compiled code that reaches the
// core through the Python package instead of linking it (escoin.c_api()).
#include "escoin/escoin.h"

extern "C" const escoin_api_t* escoin_api(void) {
  static const escoin_api_t table = {
      ESCOIN_API_VERSION,
      &escoin_last_error,
      &escoin_conv_layout,
      &escoin_workspace_size,
      &escoin_conv2d_forward_cpu,
      &escoin_conv2d_forward_cpu_trusted,
      &escoin_conv2d_forward_cuda,
      &escoin_cuda_pointer_device,
      &escoin_tile_program_write_weights,
  };
  return &table;
}
