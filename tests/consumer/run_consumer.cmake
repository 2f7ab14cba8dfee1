# Installs cpet into a scratch prefix, then configures, builds and runs tests/consumer/app twice:
# against the installed package (find_package) and against the source tree (add_subdirectory).
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

run("${CMAKE_COMMAND}" -S "${CPET_SOURCE_DIR}" -B "${WORK_DIR}/cpet-build" -G "${CMAKE_GENERATOR}"
    -DCPET_BUILD_TESTS=OFF -DCPET_BUILD_BENCH=OFF -DCPET_BUILD_EXAMPLES=OFF "-DCMAKE_INSTALL_PREFIX=${prefix}")
run("${CMAKE_COMMAND}" --install "${WORK_DIR}/cpet-build")

run("${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/app" -B "${WORK_DIR}/pkg" -G "${CMAKE_GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_BUILD_TYPE=Release)
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/pkg")
run("${WORK_DIR}/pkg/app")

run("${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/app" -B "${WORK_DIR}/sub" -G "${CMAKE_GENERATOR}"
    -DUSE_SUBDIRECTORY=ON "-DCPET_SOURCE_DIR=${CPET_SOURCE_DIR}" -DCMAKE_BUILD_TYPE=Release)
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/sub")
run("${WORK_DIR}/sub/app")
