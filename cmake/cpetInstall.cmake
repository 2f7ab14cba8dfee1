# Install rules: headers, the cpet::cpet target, and a relocatable cpetConfig.cmake + version file so a
# downstream project can find_package(cpet CONFIG REQUIRED).
include(CMakePackageConfigHelpers)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/cpet" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS cpet EXPORT cpetTargets)
install(EXPORT cpetTargets NAMESPACE cpet:: DESTINATION "${CMAKE_INSTALL_DATADIR}/cmake/cpet")

set(CPET_CONFIG_WITH_OPENMP OFF)
if(CPET_WITH_OPENMP AND OpenMP_CXX_FOUND)
  set(CPET_CONFIG_WITH_OPENMP ON)
endif()
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/cpetConfig.cmake.in"
                              "${PROJECT_BINARY_DIR}/cpetConfig.cmake"
                              INSTALL_DESTINATION "${CMAKE_INSTALL_DATADIR}/cmake/cpet")
# Header-only: the package fits any architecture.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/cpetConfigVersion.cmake" COMPATIBILITY SameMajorVersion
                                 ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/cpetConfig.cmake" "${PROJECT_BINARY_DIR}/cpetConfigVersion.cmake"
              "${PROJECT_SOURCE_DIR}/cmake/cpetXsimdFixup.cmake"
        DESTINATION "${CMAKE_INSTALL_DATADIR}/cmake/cpet")
