// Smallest real use of the package: a packed GEMM checked against a hand-computed product.
#include <cpet/cpet.hpp>

#include <cmath>
#include <cstdio>

int main() {
    cpet::Matrix<float> w(3, 2), x(1, 2), y(1, 3);
    const float wv[] = {1, 2, 3, 4, 5, 6};
    for (int i = 0; i < 6; ++i) w.data()[i] = wv[i];
    x(0, 0) = 1.f;
    x(0, 1) = -1.f;
    cpet::kernels::gemm_f32(x, cpet::kernels::packed_weights_f32(w), y);
    const bool ok = std::fabs(y(0, 0) + 1) < 1e-6f && std::fabs(y(0, 1) + 1) < 1e-6f && std::fabs(y(0, 2) + 1) < 1e-6f;
    std::printf("consumer: y = [%g %g %g] on %s: %s\n", y(0, 0), y(0, 1), y(0, 2),
                std::string(cpet::arch::name(cpet::arch::active())).c_str(), ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
