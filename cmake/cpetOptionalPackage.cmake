# cpet_find_optional_config(<name> <message when missing>): find_package(<name> CONFIG) for a peer that cpet's
# benches compare against, but only after a throwaway project has shown that the package's config loads.
# A package config can fail hard even under QUIET (Debian's oneDNN config calls find_package(OpenCL REQUIRED) for
# its GPU runtime, and libdnnl-dev only recommends the OpenCL headers); such a peer is then reported and skipped,
# never a reason for cpet's own configuration to stop. Sets <name>_FOUND in the caller's scope.
function(cpet_find_optional_config name missing_hint)
  set(_dir "${CMAKE_BINARY_DIR}/cpet_probe/${name}")
  file(WRITE "${_dir}/src/CMakeLists.txt"
       "cmake_minimum_required(VERSION 3.20)\nproject(cpet_probe_${name} LANGUAGES CXX)\n"
       "find_package(${name} CONFIG REQUIRED)\n")
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${_dir}/src" -B "${_dir}/build" -G "${CMAKE_GENERATOR}"
                          "-DCMAKE_PREFIX_PATH=${CMAKE_PREFIX_PATH}" "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}"
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    string(REGEX MATCH "Could NOT find [^\n]*|Could not find a package configuration file[^\n]*" _why "${_err}")
    if(NOT _why)
      set(_why "its package config failed to load")
    endif()
    message(STATUS "cpet bench: ${name} not used (${_why}); ${missing_hint}")
    set(${name}_FOUND FALSE PARENT_SCOPE)
    return()
  endif()
  find_package(${name} QUIET CONFIG)
  set(${name}_FOUND ${${name}_FOUND} PARENT_SCOPE)
endfunction()
