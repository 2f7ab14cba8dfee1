// Placeholder until the layer lands: runs one GEMM.
#include <cpet/cpet.hpp>
#include <cstdio>
int main() {
    cpet::Matrix<float> w(4, 4), x(2, 4), y(2, 4);
    cpet::kernels::gemm_f32(x, cpet::kernels::packed_weights_f32(w), y);
    std::printf("ok\n");
}
