# Finds cpet's dependencies; a missing one stops configuration with the Debian package that provides it.
include(GNUInstallDirs)

macro(cpet_require_package name debian_pkg)
  find_package(${name} ${ARGN} QUIET CONFIG)
  if(NOT ${name}_FOUND)
    message(FATAL_ERROR "cpet needs ${name}, which was not found. On Debian/Ubuntu: apt-get install ${debian_pkg} "
                        "(or point CMAKE_PREFIX_PATH at an install of it).")
  endif()
endmacro()

cpet_require_package(Eigen3 libeigen3-dev 3.4)
cpet_require_package(xsimd libxsimd-dev)
include(cpetXsimdFixup)

if(CPET_WITH_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
  if(NOT OpenMP_CXX_FOUND)
    message(WARNING "cpet: OpenMP not found (GCC ships it; for clang: apt-get install libomp-dev); kernels run on one thread.")
  endif()
endif()

# io/ (safetensors, HF checkpoints, PEFT adapters, cpet's files) parses JSON with nlohmann/json; the rest of the
# library does not, so it is optional here: cpet::io (below) and cpet's own io tests, examples and benches need it.
find_package(nlohmann_json 3 QUIET CONFIG)
