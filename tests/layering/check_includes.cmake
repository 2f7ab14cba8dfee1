# tests/layering/check_includes.cmake — fails when a header of include/cpet includes a room it may not know.
#
#   cmake -DCPET_INCLUDE_DIR=<dir holding cpet/> -P check_includes.cmake
#
# The rooms and what each may include, from DESIGN.md's table ("a file may include only from rooms above it",
# narrowed where the table says so: pet/ knows core/, arch/ (through kernels/) and kernels/, not compress/).
# Every quoted include "cpet/<room>/..." of every header under cpet/<room>/ is checked; the umbrella
# cpet/cpet.hpp may include anything and no room may include it. Unknown rooms fail too, so a new room is added
# here on purpose. cuda/ mirrors the CPU rooms and may include any of them.
cmake_minimum_required(VERSION 3.20)

if(NOT CPET_INCLUDE_DIR)
  message(FATAL_ERROR "check_includes.cmake: pass -DCPET_INCLUDE_DIR=<directory holding cpet/>")
endif()

get_filename_component(CPET_INCLUDE_DIR "${CPET_INCLUDE_DIR}" ABSOLUTE)

set(_rooms core arch kernels compress pet nn train strategy serve io cuda)
set(_allowed_core     core)
set(_allowed_arch     core arch)
set(_allowed_kernels  core arch kernels)
set(_allowed_compress core arch kernels compress)
set(_allowed_pet      core arch kernels pet)
set(_allowed_nn       core arch kernels compress pet nn)
set(_allowed_train    core arch kernels compress pet nn train)
set(_allowed_strategy core arch kernels compress pet nn train strategy)
set(_allowed_serve    core arch kernels compress pet nn serve)
set(_allowed_io       core arch kernels compress pet nn train strategy serve io)
set(_allowed_cuda     core arch kernels compress pet nn train strategy serve io cuda)

file(GLOB_RECURSE _headers RELATIVE "${CPET_INCLUDE_DIR}" "${CPET_INCLUDE_DIR}/cpet/*.hpp"
     "${CPET_INCLUDE_DIR}/cpet/*.cuh")
list(LENGTH _headers _count)
if(_count EQUAL 0)
  message(FATAL_ERROR "check_includes.cmake: no headers under ${CPET_INCLUDE_DIR}/cpet")
endif()

set(_violations 0)
foreach(h ${_headers})
  if(h STREQUAL "cpet/cpet.hpp")
    continue()
  endif()
  if(NOT h MATCHES "^cpet/([^/]+)/")
    message(SEND_ERROR "${h}: a header outside every room (only cpet/cpet.hpp may sit at the top)")
    math(EXPR _violations "${_violations} + 1")
    continue()
  endif()
  set(_room "${CMAKE_MATCH_1}")
  if(NOT _room IN_LIST _rooms)
    message(SEND_ERROR "${h}: room ${_room}/ is not one of DESIGN.md's rooms (${_rooms}); add it to "
                       "tests/layering/check_includes.cmake with what it may include")
    math(EXPR _violations "${_violations} + 1")
    continue()
  endif()
  file(STRINGS "${CPET_INCLUDE_DIR}/${h}" _lines REGEX "^[ \t]*#[ \t]*include[ \t]*\"cpet/")
  foreach(line ${_lines})
    string(REGEX MATCH "\"cpet/[^\"]+\"" _inc "${line}")
    string(REPLACE "\"" "" _inc "${_inc}")
    if(_inc STREQUAL "cpet/cpet.hpp")
      message(SEND_ERROR "${h} includes the umbrella cpet/cpet.hpp (a room includes the headers it needs)")
      math(EXPR _violations "${_violations} + 1")
      continue()
    endif()
    string(REGEX MATCH "^cpet/([^/]+)/" _m "${_inc}")
    set(_to "${CMAKE_MATCH_1}")
    if(NOT _to IN_LIST _allowed_${_room})
      string(REPLACE ";" ", " _may "${_allowed_${_room}}")
      message(SEND_ERROR "${h} includes ${_inc}: room ${_room}/ may include only ${_may} "
                         "(DESIGN.md's order of rooms)")
      math(EXPR _violations "${_violations} + 1")
    endif()
  endforeach()
endforeach()

if(_violations GREATER 0)
  message(FATAL_ERROR "${_violations} include(s) against the room order in ${_count} headers")
endif()
message(STATUS "room order holds in ${_count} headers")
